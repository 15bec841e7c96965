"""The report's figures, from the run's ledger and its committed checkpoints: pure, no I/O.

:func:`compute` returns the dict that ``report.json`` holds, and that the picture and
the page are drawn from. Its keys are stable; times are ISO 8601 UTC, durations seconds,
money US dollars. Any figure that cannot be known from what was recorded is null.

Top-level keys:

``format``
    ``"spot-report/1"``.
``run_id``, ``generated_at``
    The run, and when this report was made.
``complete``
    Whether the run is finished (``complete.json`` is in storage); null: not asked.
``newest_committed_step``
    The newest committed checkpoint's step (null: none).
``started_at``, ``ended_at``, ``wall_clock_seconds``, ``wall_clock_hours``
    From the first instance's start (its boot event's time less its ``host_uptime_s``:
    an instance is billed from before the supervisor starts) to the last event recorded.
``boots``, ``instances``
    Supervisor starts; distinct instances (by instance id; a boot with none is its own).
``instance_seconds``, ``instance_hours``
    Every instance's time, summed (two instances at once count twice).
``training_seconds``
    Wall-clock time in which training was done that is in a committed checkpoint: per
    boot, from its trainer's start (``train_start``; else its last restore or slot
    taken before its first progress) to the creation of the newest checkpoint made in
    that boot and committed; the union over boots.
``training_instance_seconds``
    The same per boot, summed (equals ``training_seconds`` for one node).
``goodput``
    ``training_instance_seconds / instance_seconds``: the fraction of paid instance time
    that went into the result.
``overhead``
    ``ratio``: ``(wall_clock_seconds - training_seconds) / training_seconds``, the extra
    wall clock over the training itself, to set against the seed article's "budget for
    about 10-15% extra wall-clock time"; ``percent``: the same in percent;
    ``seed_budget_percent``: ``[10, 15]``; ``verdict``: ``under``, ``within`` or
    ``over`` that budget.
``interruptions``
    Times a training boot lost its instance: a notice of kind ``interruption`` or
    ``maintenance`` while it trained, or a training boot that ended without an ``exit``
    and was followed by another boot (gone without a notice).
``standby_interruptions``
    Notices on boots that were not training (in standby, or still restoring): nothing
    of the run was lost there.
``lost_seconds``
    Summed over interruptions: training between the newest checkpoint of that boot that
    was committed and the notice (or, with no notice, the boot's last event). 0 when the
    emergency checkpoint, made after the notice, was committed.
``lost_steps``
    ``lost_seconds`` at the boot's measured rate (steps between its first and last
    committed checkpoints over the time between them; else the run's), rounded per
    interruption: an estimate, since the ledger sees checkpoints, not steps.
``recovery_seconds_mean``, ``recovery_seconds_max``
    Per interruption, from the notice to the first new checkpoint that any other boot's
    trainer then wrote (``first_step``; else a commit).
``cost``
    ``spot_usd``: what the instances cost as they ran (each instance's hours at its spot
    price, from ``--price TYPE=USD``, else the ledger's ``price_usd_per_hour``; an
    on-demand instance at its on-demand price). ``on_demand_usd``: the same hours at
    on-demand prices (``--on-demand``, else the dated list prices of
    :mod:`daemon.fleet.catalog`). ``saving``: ``1 - spot_usd / on_demand_usd``.
    ``on_demand_training_usd``: only the training time, at on-demand prices (an
    on-demand run is not interrupted). ``unpriced``: instances without a price (their
    hours are left out of the sums above, which are then lower bounds).
``per_boot``
    One row per boot: ``boot_id``, ``instance_id``, ``instance_type``,
    ``availability_zone``, ``lifecycle``, ``node_id``, ``slot``, ``start``, ``end``,
    ``seconds``, ``restored_step``, ``restore_seconds``, ``standby``,
    ``handoff_seconds``, ``train_start``, ``training_seconds`` (its part of
    ``training_instance_seconds``), ``commits``, ``last_committed_step``, ``notice``
    (``{t, kind, action}`` of the interrupting one), ``stop_reason``, ``exit_code``,
    ``vanished`` (trained, no ``exit``, and a later boot came), ``skipped_lines``.
``per_instance``
    One row per instance: ``instance_id``, ``lane`` (the name it is drawn under),
    ``instance_type``, ``availability_zone``, ``lifecycle``, ``boots``, ``start``,
    ``end``, ``seconds``, ``price_usd_per_hour`` and ``price_source`` (``--price``,
    ``ledger``, ``list price``, ``--on-demand``), ``on_demand_usd_per_hour``,
    ``on_demand_source``, ``usd``, ``on_demand_usd``.
``per_interruption``
    One row per interruption: ``boot_id``, ``instance_id``, ``instance_type``, ``at``,
    ``cause`` (``notice`` or ``vanished``), ``kind``, ``action``, ``saved_step`` and
    ``saved_at`` (the newest checkpoint of that boot that was committed), ``lost_seconds``,
    ``lost_steps``, ``recovered_by`` (the boot whose first step ended the recovery),
    ``recovery_seconds``, ``resumed_seconds`` (to the next trainer's start).
``timeline``
    What the picture draws: ``start``, ``end``, ``lanes`` (one per instance:
    ``intervals`` it was up, ``supervisor`` spans, ``training``, ``lost`` and
    ``standby`` spans), ``markers`` (``lane``, ``t``, ``label``, ``kind``: ``notice``
    (one that interrupts), ``rebalance``, ``stop`` (any other: an operator's stop),
    ``commit``, ``restore``, ``first_step``, ``gone`` (a boot's end without a notice
    or an exit)), ``committed_steps`` (``[time, step]``, rising), ``interruptions``
    (their times).
``notes``
    Sentences for the reader: assumptions taken, lines skipped, prices missing.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.ledger import INTERRUPTING_KINDS, Boot, format_time, parse_time

FORMAT = "spot-report/1"
SEED_BUDGET_PERCENT = (10.0, 15.0)  # the seed article: "Budget for about 10-15% extra wall-clock"

Interval = tuple[dt.datetime, dt.datetime]
OnDemandLookup = Callable[[str | None, str], float | None]


@dataclass(frozen=True)
class Committed:
    """A committed checkpoint as storage lists it (the report's second source)."""

    step: int
    reason: str
    created_at: dt.datetime | None
    bytes: int = 0


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


# -- per boot ---------------------------------------------------------------------------


@dataclass
class _BootView:
    boot: Boot
    lane: str
    uptime: float | None
    train_start: dt.datetime | None = None
    made: list[tuple[int, dt.datetime]] = field(default_factory=list)  # (step, created)
    notice: tuple[dt.datetime, str, str] | None = None  # (t, kind, action) interrupting
    standby_notice: bool = False
    vanished: bool = False  # trained, no exit, and a later boot came

    @property
    def info(self) -> Mapping[str, Any]:
        return self.boot.info

    @property
    def productive_end(self) -> dt.datetime | None:
        return max((c for _, c in self.made), default=None)

    @property
    def productive(self) -> Interval | None:
        end = self.productive_end
        if self.train_start is None or end is None or end <= self.train_start:
            return None
        return (self.train_start, end)

    @property
    def stopped_at(self) -> dt.datetime | None:
        """When an interruption ended its training (None: it was not interrupted)."""
        if self.notice is not None:
            return self.notice[0]
        if self.vanished:
            return self.boot.end
        return None


def _seconds(a: dt.datetime, b: dt.datetime) -> float:
    return (b - a).total_seconds()


def _union(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for s, e in sorted(intervals):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _length(intervals: Iterable[Interval]) -> float:
    return sum(_seconds(s, e) for s, e in _union(intervals))


def _iso(t: dt.datetime | None) -> str | None:
    return format_time(t) if t is not None else None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _created_times(boots: Sequence[Boot], committed: Sequence[Committed]) -> dict[int, dt.datetime]:
    """When each committed step's checkpoint was made: the ledger's ``created_at``, else
    the manifest's in storage, else the first commit event's time."""
    created: dict[int, dt.datetime] = {}
    fallback: dict[int, dt.datetime] = {}
    for b in boots:
        for ev in b.all("commit"):
            step = _int(ev.get("step"))
            if step is None:
                continue
            at = parse_time(ev.get("created_at"))
            if at is not None:
                created.setdefault(step, at)
            if step not in fallback or ev.t < fallback[step]:
                fallback[step] = ev.t
    for c in committed:
        if c.created_at is not None:
            created.setdefault(c.step, c.created_at)
    for step, t in fallback.items():
        created.setdefault(step, t)
    return created


def _train_start(b: Boot, first_progress: dt.datetime | None) -> dt.datetime | None:
    ev = b.first("train_start")
    if ev is not None:
        return ev.t
    if first_progress is None:
        return None  # never trained (standby throughout, or gone before a checkpoint)
    # An older ledger without train_start: the trainer starts right after the last
    # restore (or the slot taken) before its first progress.
    before = [
        e.t for e in b.events if e.name in ("restore", "slot_taken") and e.t <= first_progress
    ]
    return max(before) if before else b.start


def _uptime(b: Boot) -> float | None:
    """Seconds the instance ran before this boot: from its launch time (the identity
    document's ``pendingTime``) where the ledger has it, else the host's uptime."""
    launched = parse_time(b.info.get("launched_at"))
    if launched is not None:
        return max((b.start - launched).total_seconds(), 0.0)
    return _num(b.info.get("host_uptime_s"))


def _views(boots: Sequence[Boot], created: Mapping[int, dt.datetime]) -> list[_BootView]:
    views: list[_BootView] = []
    for i, b in enumerate(boots):
        info = b.info
        lane = str(info.get("instance_id") or f"boot {b.boot_id}")
        v = _BootView(b, lane, _uptime(b))
        progress = [e.t for e in b.events if e.name in ("first_step", "commit")]
        v.train_start = _train_start(b, min(progress) if progress else None)
        if v.train_start is not None:
            # Checkpoints made while this boot trained (committed by it, or by a later boot
            # of the same machine that found the local one): its work that survived.
            v.made = sorted(
                (step, at) for step, at in created.items() if v.train_start <= at <= b.end
            )
        for ev in b.all("notice"):
            kind = str(ev.get("kind") or "")
            if kind not in INTERRUPTING_KINDS:
                continue
            if v.train_start is not None and v.train_start <= ev.t:
                v.notice = (ev.t, kind, str(ev.get("action") or ""))
            else:
                v.standby_notice = True
            break
        later = any(o.start > b.start for o in boots[i + 1 :])
        v.vanished = v.notice is None and not b.exited and later and v.train_start is not None
        views.append(v)
    return views


def _rate(made: Sequence[tuple[int, dt.datetime]]) -> tuple[float, float] | None:
    """(steps, seconds) between the first and last checkpoint made, if both are > 0."""
    if len(made) < 2:
        return None
    steps = made[-1][0] - made[0][0]
    secs = _seconds(made[0][1], made[-1][1])
    return (steps, secs) if steps > 0 and secs > 0 else None


# -- the figures ------------------------------------------------------------------------


def compute(
    boots: Sequence[Boot],
    committed: Sequence[Committed] = (),
    *,
    run_id: str,
    pricing: Pricing | None = None,
    complete: bool | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The report (``report.json``'s content) of one run. ``boots`` as
    :func:`daemon.ledger.read_ledger` returns them; ``committed``: storage's listing."""
    pricing = pricing or Pricing()
    lookup = pricing.on_demand_lookup or catalog_on_demand
    notes: list[str] = []
    if not boots:
        raise ValueError("the ledger holds no boot: nothing to report")
    skipped = sum(b.skipped_lines for b in boots)
    if skipped:
        notes.append(f"{skipped} ledger line(s) that were not events were skipped.")
    created = _created_times(boots, committed)
    reasons = {
        int(ev.get("step")): str(ev.get("reason"))
        for b in boots
        for ev in b.all("commit")
        if isinstance(ev.get("step"), int)
    }
    views = _views(boots, created)

    # Instances: the union of [boot start - uptime, boot end] of each machine's boots.
    lanes: dict[str, list[_BootView]] = {}
    for v in views:
        lanes.setdefault(v.lane, []).append(v)
    instance_rows: list[dict[str, Any]] = []
    lane_intervals: dict[str, list[Interval]] = {}
    for lane, vs in lanes.items():
        spans = [(v.boot.start - dt.timedelta(seconds=v.uptime or 0.0), v.boot.end) for v in vs]
        lane_intervals[lane] = _union(spans)
        instance_rows.append(_instance_row(lane, vs, lane_intervals[lane], pricing, lookup))
    all_spans = [iv for ivs in lane_intervals.values() for iv in ivs]
    started = min(s for s, _ in all_spans)
    ended = max(e for _, e in all_spans)
    wall = _seconds(started, ended)
    instance_s = sum(r["seconds"] for r in instance_rows)
    if any(v.uptime is None for v in views):
        notes.append(
            "Some boots recorded no host uptime: their instance time counts from the "
            "supervisor's start, without the machine's own boot."
        )

    productive = [v.productive for v in views]
    training_instance_s = sum(_seconds(*p) for p in productive if p is not None)
    training_s = _length(p for p in productive if p is not None)
    goodput = training_instance_s / instance_s if instance_s > 0 else None

    # The run's own rate, for boots with fewer than two checkpoints of their own.
    rates = [r for r in (_rate(v.made) for v in views) if r is not None]
    run_rate = sum(s for s, _ in rates) / sum(t for _, t in rates) if rates else None

    first_steps = sorted(
        (e.t, v.boot.boot_id) for v in views for e in v.boot.all("first_step")
    ) or sorted((e.t, v.boot.boot_id) for v in views for e in v.boot.all("commit"))
    interruptions: list[dict[str, Any]] = []
    for v in views:
        stop = v.stopped_at
        if stop is None:
            continue
        saved_at = v.productive_end if v.productive_end is not None else v.train_start
        lost_s = max(0.0, _seconds(saved_at, stop)) if saved_at is not None else 0.0
        if v.made and reasons.get(v.made[-1][0]) == "interrupt":
            # Saved because of this stop, at the step boundary after it: nothing but the
            # partial step was lost (created_at has whole seconds and may read earlier).
            lost_s = 0.0
        own = _rate(v.made)
        rate = own[0] / own[1] if own else run_rate
        saved_step = v.made[-1][0] if v.made else _int((v.boot.first("restore") or _NO).get("step"))
        nxt = next(((t, b) for t, b in first_steps if t > stop and b != v.boot.boot_id), None)
        resumed = min(
            (e.t for o in views if o is not v for e in o.boot.all("train_start") if e.t > stop),
            default=None,
        )
        interruptions.append(
            {
                "boot_id": v.boot.boot_id,
                "instance_id": v.info.get("instance_id"),
                "instance_type": v.info.get("instance_type"),
                "at": _iso(stop),
                "cause": "notice" if v.notice is not None else "vanished",
                "kind": v.notice[1] if v.notice else None,
                "action": v.notice[2] if v.notice else None,
                "saved_step": saved_step,
                "saved_at": _iso(v.productive_end),
                "lost_seconds": round(lost_s, 3),
                "lost_steps": round(lost_s * rate) if rate is not None else None,
                "recovered_by": nxt[1] if nxt else None,
                "recovery_seconds": round(_seconds(stop, nxt[0]), 3) if nxt else None,
                "resumed_seconds": round(_seconds(stop, resumed), 3) if resumed else None,
            }
        )
    if any(i["cause"] == "vanished" for i in interruptions):
        notes.append(
            "A boot that ended without a notice or an exit (its machine gone, or the "
            "supervisor killed) has its lost work counted to its last recorded event: a "
            "lower bound."
        )
    lost_s = sum(i["lost_seconds"] for i in interruptions)
    lost_steps_known = [i["lost_steps"] for i in interruptions if i["lost_steps"] is not None]
    lost_steps = sum(lost_steps_known) if len(lost_steps_known) == len(interruptions) else None
    recoveries = [i["recovery_seconds"] for i in interruptions if i["recovery_seconds"] is not None]
    if any(i["lost_steps"] is None for i in interruptions):
        notes.append("Lost steps are unknown where no step rate could be measured.")

    overhead: dict[str, Any] = {
        "ratio": None,
        "percent": None,
        "seed_budget_percent": list(SEED_BUDGET_PERCENT),
        "verdict": None,
    }
    if training_s > 0:
        ratio = (wall - training_s) / training_s
        pct = ratio * 100
        lo, hi = SEED_BUDGET_PERCENT
        overhead.update(
            ratio=round(ratio, 6),
            percent=round(pct, 3),
            verdict="under" if pct < lo else "within" if pct <= hi else "over",
        )

    cost = _cost(instance_rows, views, pricing, lookup, notes)
    newest = max((c.step for c in committed), default=None)
    if newest is None:
        newest = max(created, default=None)
    return {
        "format": FORMAT,
        "run_id": run_id,
        "generated_at": _iso(now or dt.datetime.now(dt.timezone.utc)),
        "complete": complete,
        "newest_committed_step": newest,
        "started_at": _iso(started),
        "ended_at": _iso(ended),
        "wall_clock_seconds": round(wall, 3),
        "wall_clock_hours": round(wall / 3600, 6),
        "boots": len(boots),
        "instances": len(instance_rows),
        "instance_seconds": round(instance_s, 3),
        "instance_hours": round(instance_s / 3600, 6),
        "training_seconds": round(training_s, 3),
        "training_instance_seconds": round(training_instance_s, 3),
        "goodput": round(goodput, 6) if goodput is not None else None,
        "overhead": overhead,
        "interruptions": len(interruptions),
        "standby_interruptions": sum(1 for v in views if v.standby_notice),
        "lost_seconds": round(lost_s, 3),
        "lost_steps": lost_steps,
        "recovery_seconds_mean": (
            round(sum(recoveries) / len(recoveries), 3) if recoveries else None
        ),
        "recovery_seconds_max": max(recoveries) if recoveries else None,
        "cost": cost,
        "per_boot": [_boot_row(v) for v in views],
        "per_instance": instance_rows,
        "per_interruption": interruptions,
        "timeline": _timeline(views, lane_intervals, created, started, ended, interruptions),
        "notes": notes,
    }


class _NoEvent:
    def get(self, key: str, default: Any = None) -> Any:
        return default


_NO = _NoEvent()


def _boot_row(v: _BootView) -> dict[str, Any]:
    b = v.boot
    restore = b.last("restore")
    exit_ev = b.last("exit")
    stop = b.last("stop")
    taken = b.last("slot_taken")
    commits = b.all("commit")
    p = v.productive
    return {
        "boot_id": b.boot_id,
        "instance_id": v.info.get("instance_id"),
        "instance_type": v.info.get("instance_type"),
        "availability_zone": v.info.get("availability_zone"),
        "lifecycle": v.info.get("lifecycle"),
        "node_id": v.info.get("node_id"),
        "slot": _int(taken.get("slot")) if taken else _int(v.info.get("slot")),
        "start": _iso(b.start),
        "end": _iso(b.end),
        "seconds": round(_seconds(b.start, b.end), 3),
        "restored_step": _int(restore.get("step")) if restore else None,
        "restore_seconds": _num(restore.get("seconds")) if restore else None,
        "standby": b.first("standby") is not None,
        "handoff_seconds": _num(taken.get("handoff_seconds")) if taken else None,
        "train_start": _iso(v.train_start),
        "training_seconds": round(_seconds(*p), 3) if p else 0.0,
        "commits": len(commits),
        "last_committed_step": max((_int(c.get("step")) or 0 for c in commits), default=None),
        "notice": (
            {"t": _iso(v.notice[0]), "kind": v.notice[1], "action": v.notice[2]}
            if v.notice
            else None
        ),
        "stop_reason": stop.get("reason") if stop else None,
        "exit_code": _int(exit_ev.get("code")) if exit_ev else None,
        "vanished": v.vanished,
        "skipped_lines": b.skipped_lines,
    }


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


def _timeline(
    views: Sequence[_BootView],
    lane_intervals: Mapping[str, Sequence[Interval]],
    created: Mapping[int, dt.datetime],
    started: dt.datetime,
    ended: dt.datetime,
    interruptions: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    order = list(lane_intervals)
    lanes: list[dict[str, Any]] = []
    for lane in order:
        vs = [v for v in views if v.lane == lane]
        info = next((v.info for v in vs if v.info.get("instance_type")), vs[0].info)
        lost: list[list[str | None]] = []
        nothing_lost = {i["boot_id"] for i in interruptions if i.get("lost_seconds") == 0}
        for v in vs:
            stop = v.stopped_at
            saved = v.productive_end or v.train_start
            if v.boot.boot_id in nothing_lost:
                continue  # saved at the stop (an interrupt checkpoint): no hatch
            if stop is not None and saved is not None and saved < stop:
                lost.append([_iso(saved), _iso(stop)])
        standby: list[list[str | None]] = []
        for v in vs:
            waiting = v.boot.first("standby")
            if waiting is not None:
                taken = next((e.t for e in v.boot.all("slot_taken") if e.t >= waiting.t), None)
                standby.append([_iso(waiting.t), _iso(taken or v.boot.end)])
        lanes.append(
            {
                "lane": lane,
                "instance_type": info.get("instance_type"),
                "lifecycle": info.get("lifecycle"),
                "intervals": [[_iso(s), _iso(e)] for s, e in lane_intervals[lane]],
                "supervisor": [[_iso(v.boot.start), _iso(v.boot.end)] for v in vs],
                "training": [[_iso(p[0]), _iso(p[1])] for v in vs if (p := v.productive)],
                "lost": lost,
                "standby": standby,
            }
        )
    markers: list[dict[str, Any]] = []
    for v in views:
        idx = order.index(v.lane)
        for ev in v.boot.events:
            kind = None
            label = ""
            if ev.name == "notice":
                kind = ev.get("kind")
                kind = (
                    "notice"
                    if kind in INTERRUPTING_KINDS
                    else kind
                    if kind == "rebalance"
                    else "stop"
                )
                label = str(ev.get("action") or ev.get("kind") or "")
            elif ev.name == "commit":
                kind, label = "commit", f"step {ev.get('step')} ({ev.get('reason')})"
            elif ev.name == "restore":
                kind, label = "restore", f"restored step {ev.get('step')}"
            elif ev.name == "first_step":
                kind, label = "first_step", f"first new step {ev.get('step')}"
            if kind is not None:
                markers.append({"lane": idx, "t": _iso(ev.t), "kind": kind, "label": label})
        if v.vanished:
            markers.append(
                {"lane": idx, "t": _iso(v.boot.end), "kind": "gone", "label": "gone, no notice"}
            )
    # The committed step over time: each step from its first commit event, else from
    # its creation (a checkpoint storage lists that no ledger line records).
    commit_times: dict[int, dt.datetime] = {}
    for v in views:
        for ev in v.boot.all("commit"):
            step = _int(ev.get("step"))
            if step is not None and (step not in commit_times or ev.t < commit_times[step]):
                commit_times[step] = ev.t
    for step, at in created.items():
        commit_times.setdefault(step, at)
    steps: list[list[Any]] = []
    best = -1
    for at, step in sorted((t, s) for s, t in commit_times.items()):
        if step > best:
            best = step
            steps.append([_iso(at), step])
    return {
        "start": _iso(started),
        "end": _iso(ended),
        "lanes": lanes,
        "markers": markers,
        "committed_steps": steps,
        "interruptions": [i["at"] for i in interruptions],
    }
