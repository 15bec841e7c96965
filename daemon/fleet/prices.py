"""``spot-supervisor prices``: the spot price now, per region and Availability Zone, against
the on-demand price, and the saving.

Spot prices come from EC2 (DescribeSpotPriceHistory from now on, as in the seed's
``aws ec2 describe-spot-price-history`` check): the newest price of each type in each AZ.
A type with no history in a region is not offered as spot there. On-demand prices come
from :mod:`daemon.fleet.catalog` (dated list prices) unless ``--on-demand TYPE=USD`` says
otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from daemon.fleet import catalog

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

# Both descriptions name Linux spot prices (the second for VPC launches, i.e. all of
# today's); EC2 lists one or the other depending on the account and region.
PRODUCTS = ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"]


@dataclass(frozen=True)
class Row:
    """One type in one AZ."""

    region: str
    zone: str
    instance_type: str
    spot_usd: float
    on_demand_usd: float | None
    at: str  # when that spot price took effect, ISO 8601 UTC

    @property
    def saving(self) -> float | None:
        """The fraction of the on-demand price saved (0.7 for 70 %), if it is known."""
        if not self.on_demand_usd:
            return None
        return 1.0 - self.spot_usd / self.on_demand_usd


@dataclass
class Region:
    """What one region said: rows, types without spot history, or the error."""

    name: str
    rows: list[Row]
    no_spot: list[str]
    error: str | None = None


def spot_prices(
    ec2: EC2Client,
    region: str,
    types: Sequence[str],
    on_demand: Mapping[str, float],
    now: dt.datetime | None = None,
) -> Region:
    """The current spot price of each type in each AZ of one region."""
    start = now or dt.datetime.now(dt.timezone.utc)
    newest: dict[tuple[str, str], tuple[dt.datetime, float]] = {}
    try:
        for page in ec2.get_paginator("describe_spot_price_history").paginate(
            InstanceTypes=list(types),  # type: ignore[arg-type]
            ProductDescriptions=PRODUCTS,
            StartTime=start,
        ):
            for p in page.get("SpotPriceHistory", []):
                key = (p["InstanceType"], p["AvailabilityZone"])
                when = p["Timestamp"]
                if key not in newest or when > newest[key][0]:
                    newest[key] = (when, float(p["SpotPrice"]))
    except (ClientError, BotoCoreError) as exc:
        return Region(region, [], [], error=str(exc))
    rows = []
    for (itype, zone), (when, price) in newest.items():
        od = on_demand.get(itype, catalog.on_demand_usd(region, itype))
        stamp = when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append(Row(region, zone, itype, price, od, stamp))
    order = {t: i for i, t in enumerate(types)}
    rows.sort(key=lambda r: (order.get(r.instance_type, len(order)), r.spot_usd, r.zone))
    seen = {r.instance_type for r in rows}
    return Region(region, rows, [t for t in types if t not in seen])


def parse_on_demand(pairs: Sequence[str]) -> dict[str, float]:
    """``--on-demand TYPE=USD`` flags as a table; a malformed one raises ValueError."""
    return catalog.parse_prices("--on-demand", pairs, example="p4d.24xlarge=21.96")


def render(regions: Sequence[Region], overridden: Mapping[str, float]) -> str:
    """The table, then what it could not show, then where on-demand prices come from."""
    head = ("region", "zone", "type", "spot $/h", "on-demand $/h", "saving")
    body: list[tuple[str, ...]] = []
    tail: list[str] = []
    for reg in regions:
        if reg.error:
            tail.append(f"{reg.name}: cannot read spot prices: {reg.error}")
            continue
        for r in reg.rows:
            od = f"{r.on_demand_usd:.4f}" if r.on_demand_usd else "-"
            saving = f"{r.saving:.0%}" if r.saving is not None else "-"
            body.append((r.region, r.zone, r.instance_type, f"{r.spot_usd:.4f}", od, saving))
        for t in reg.no_spot:
            tail.append(
                f"{reg.name}: {t}: no spot price history: not offered as spot in {reg.name}"
                " (try another region or type)"
            )
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [head, *body]
    ]
    lines += tail
    source = f"on-demand: list prices of {catalog.ON_DEMAND_AS_OF}, {catalog.ON_DEMAND_SOURCE}"
    if overridden:
        source += "; from --on-demand: " + ", ".join(f"{t}={p:g}" for t, p in overridden.items())
    lines.append(source + "; '-' where the table has no price (--on-demand TYPE=USD)")
    return "\n".join(lines)


def as_json(regions: Sequence[Region]) -> str:
    return json.dumps(
        [
            {
                "region": r.name,
                "error": r.error,
                "not_offered_as_spot": r.no_spot,
                "prices": [dict(asdict(x), saving=x.saving) for x in r.rows],
            }
            for r in regions
        ],
        indent=2,
    )


def collect(
    client_for: Callable[[str], EC2Client],
    regions: Sequence[str],
    types: Sequence[str],
    on_demand: Mapping[str, float],
) -> list[Region]:
    """Each region in turn (a handful of requests each)."""
    return [spot_prices(client_for(r), r, types, on_demand) for r in regions]
