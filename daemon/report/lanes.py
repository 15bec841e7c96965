"""The ``timeline`` part of the figures: what the picture (:mod:`daemon.report.timeline`)
draws, one lane per instance, its markers, and the committed step over time.

Computed here, with the rest of ``report.json``, so that the picture shows exactly what
the figures say. Pure, no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from daemon.ledger_format import INTERRUPTING_KINDS
from daemon.report.views import Interval, _BootView, _int, _iso


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
