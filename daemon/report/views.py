"""The ledger boot by boot, as the figures read it: when each boot trained, what it made
that was committed, whether and when an interruption ended it.

:func:`_views` turns :func:`daemon.ledger.read_ledger`'s boots (and storage's committed
checkpoints) into one :class:`_BootView` each; the figures (:mod:`daemon.report.figures`),
the costs (:mod:`daemon.report.costs`) and the timeline's lanes
(:mod:`daemon.report.lanes`) are computed from those. Also the small helpers they share
(intervals, times, loose numbers from the ledger). Pure, no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.ledger_format import INTERRUPTING_KINDS, format_time, parse_time
from daemon.ledger_reader import Boot

Interval = tuple[dt.datetime, dt.datetime]


@dataclass(frozen=True)
class Committed:
    """A committed checkpoint as storage lists it (the report's second source)."""

    step: int
    reason: str
    created_at: dt.datetime | None
    bytes: int = 0


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


class _NoEvent:
    def get(self, key: str, default: Any = None) -> Any:
        return default


_NO = _NoEvent()
