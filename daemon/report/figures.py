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
from collections.abc import Sequence
from typing import Any

from daemon.ledger_reader import Boot
from daemon.report.costs import (
    OnDemandLookup,
    Pricing,
    _cost,
    _instance_row,
    catalog_on_demand,
    region_of,
)
from daemon.report.lanes import _timeline
from daemon.report.views import (
    _NO,
    Committed,
    Interval,
    _BootView,
    _created_times,
    _int,
    _iso,
    _length,
    _num,
    _rate,
    _seconds,
    _union,
    _views,
)

FORMAT = "spot-report/1"
SEED_BUDGET_PERCENT = (10.0, 15.0)  # the seed article: "Budget for about 10-15% extra wall-clock"

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


__all__ = [
    "FORMAT",
    "SEED_BUDGET_PERCENT",
    "Committed",
    "Interval",
    "OnDemandLookup",
    "Pricing",
    "catalog_on_demand",
    "compute",
    "region_of",
]
