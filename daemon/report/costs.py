"""What the instances cost: each instance's price (``--price``, the ledger's, the on-demand
list price) and its row, and the run's spot, on-demand and saving figures.

Prices come from :class:`Pricing` (the flags) and, for on-demand, the dated list prices
of :mod:`daemon.fleet.catalog` (imported only when asked: the report's parser never
loads the fleet package). Pure, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.report.views import Interval, _BootView, _iso, _length, _num, _seconds

OnDemandLookup = Callable[[str | None, str], float | None]


@dataclass(frozen=True)
class Pricing:
    """Prices per hour by instance type: ``spot`` (``--price``) wins over the ledger's;
    ``on_demand`` (``--on-demand``) over ``on_demand_lookup(region, type)``."""

    spot: Mapping[str, float] = field(default_factory=dict)
    on_demand: Mapping[str, float] = field(default_factory=dict)
    on_demand_lookup: OnDemandLookup | None = None


def catalog_on_demand(region: str | None, instance_type: str) -> float | None:
    """The dated list price of :mod:`daemon.fleet.catalog` (US regions; an unknown
    region is taken as us-east-1, whose prices the table shares with the other two)."""
    from daemon.fleet import catalog

    return catalog.on_demand_usd(region or catalog.ON_DEMAND_REGIONS[0], instance_type)


_REGION_RE = re.compile(r"^([a-z]{2}(?:-gov)?-[a-z]+-[0-9]+)")


def region_of(zone: str | None) -> str | None:
    """``us-east-1`` for ``us-east-1a`` (and for a Local Zone such as ``us-east-1-bos-1a``)."""
    m = _REGION_RE.match(zone or "")
    return m.group(1) if m else None


def _instance_row(
    lane: str,
    vs: Sequence[_BootView],
    intervals: Sequence[Interval],
    pricing: Pricing,
    lookup: OnDemandLookup,
) -> dict[str, Any]:
    def first(key: str) -> Any:
        return next((v.info.get(key) for v in vs if v.info.get(key) is not None), None)

    itype = first("instance_type")
    lifecycle = first("lifecycle")
    zone = first("availability_zone")
    on_demand, od_source = None, None
    if itype is not None:
        if itype in pricing.on_demand:
            on_demand, od_source = pricing.on_demand[itype], "--on-demand"
        else:
            on_demand = lookup(region_of(zone), itype)
            od_source = "list price" if on_demand is not None else None
    if lifecycle == "on-demand":
        paid, paid_source = on_demand, od_source
    elif itype is not None and itype in pricing.spot:
        paid, paid_source = pricing.spot[itype], "--price"
    else:
        paid = _num(first("price_usd_per_hour"))
        paid_source = "ledger" if paid is not None else None
    seconds = _length(intervals)
    return {
        "instance_id": first("instance_id"),
        "lane": lane,
        "instance_type": itype,
        "availability_zone": zone,
        "lifecycle": lifecycle,
        "boots": len(vs),
        "start": _iso(intervals[0][0]),
        "end": _iso(intervals[-1][1]),
        "seconds": round(seconds, 3),
        "price_usd_per_hour": paid,
        "price_source": paid_source,
        "on_demand_usd_per_hour": on_demand,
        "on_demand_source": od_source,
        "usd": round(seconds / 3600 * paid, 6) if paid is not None else None,
        "on_demand_usd": round(seconds / 3600 * on_demand, 6) if on_demand is not None else None,
    }


def _cost(
    rows: Sequence[Mapping[str, Any]],
    views: Sequence[_BootView],
    pricing: Pricing,
    lookup: OnDemandLookup,
    notes: list[str],
) -> dict[str, Any]:
    unpriced = [r["lane"] for r in rows if r["usd"] is None or r["on_demand_usd"] is None]
    spot = sum(r["usd"] for r in rows if r["usd"] is not None)
    on_demand = sum(r["on_demand_usd"] for r in rows if r["on_demand_usd"] is not None)
    training_od = 0.0
    for v in views:
        p = v.productive
        itype = v.info.get("instance_type")
        if p is None or itype is None:
            continue
        price = pricing.on_demand.get(itype)
        if price is None:
            price = lookup(region_of(v.info.get("availability_zone")), itype)
        if price is not None:
            training_od += _seconds(*p) / 3600 * price
    if unpriced:
        notes.append(
            "No price for " + ", ".join(unpriced) + ": give --price TYPE=USD (spot) or "
            "--on-demand TYPE=USD; the costs shown leave those hours out."
        )
    priced_both = [r for r in rows if r["usd"] is not None and r["on_demand_usd"] is not None]
    spot_both = sum(r["usd"] for r in priced_both)
    od_both = sum(r["on_demand_usd"] for r in priced_both)
    return {
        "spot_usd": round(spot, 4) if any(r["usd"] is not None for r in rows) else None,
        "on_demand_usd": (
            round(on_demand, 4) if any(r["on_demand_usd"] is not None for r in rows) else None
        ),
        # Over the instances priced both ways, so the two sums compare like with like.
        "saving": round(1 - spot_both / od_both, 6) if od_both > 0 else None,
        "on_demand_training_usd": round(training_od, 4),
        "unpriced": unpriced,
    }
