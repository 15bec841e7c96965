"""The ledger's writer: :class:`RunLedger`, one boot's events, put to storage off the caller's
thread.

Writes are best effort and never in the caller's way (see :mod:`daemon.ledger`): events
are appended in memory, and the ledger's own daemon thread rewrites the boot's current
segment object, retrying with backoff. What a line holds is :mod:`daemon.ledger`'s
format; where it goes, :mod:`daemon.ledger_format`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.ledger_format import (
    BOOT_ID_RE,
    MAX_SEGMENT_BYTES,
    LedgerStore,
    format_time,
    new_boot_id,
    segment_key,
    utc_now,
)
from daemon.ledger_instance import InstanceFacts, MetadataReader, host_uptime_s, instance_facts

log = structlog.get_logger(__name__)

_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # backoff after 1, 2, ... failed writes in a row


def _finite(value: Any) -> Any:
    # JSON has no NaN or Infinity; such a number is "unknown".
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _when(value: dt.datetime | str | None) -> str | None:
    if isinstance(value, dt.datetime):
        return format_time(value)
    return value


class _Deferred:
    """A line whose fields are found on the ledger's thread (the boot's metadata lookups)."""

    def __init__(self, build: Callable[[], str]) -> None:
        self.build = build


@dataclass
class _Segment:
    index: int
    lines: list[str | _Deferred] = field(default_factory=list)
    size: int = 0
    written: int = 0  # lines of this segment known to be in storage
    frozen: bool = False  # full: no more lines go here


_DEFERRED_SIZE = 512  # a boot line's size, for the segment limit, before it is built


class RunLedger:
    """One boot's ledger writer: ``record`` events, ``close`` at exit.

    Never raises into the caller and never blocks it: see the module docstring.
    """

    def __init__(
        self,
        store: LedgerStore,
        *,
        boot_id: str | None = None,
        clock: Callable[[], dt.datetime] = utc_now,
        max_segment_bytes: int = MAX_SEGMENT_BYTES,
    ) -> None:
        self.boot_id = boot_id or new_boot_id(clock())
        if not BOOT_ID_RE.match(self.boot_id):
            raise ValueError(f"boot id {self.boot_id!r} is not <%Y%m%dT%H%M%SZ>-<hex>")
        self._store = store
        self._clock = clock
        self._max_bytes = max_segment_bytes
        # Re-entrant: a record() from a signal handler that interrupted one on the same
        # thread must not deadlock.
        self._cond = threading.Condition(threading.RLock())
        self._segments = [_Segment(0)]
        self._recorded = 0  # lines ever recorded
        self._durable_before = 0  # lines of segments written in full and dropped
        self._attempts = 0  # PUTs started
        self._failed_attempt = 0  # the number of the last PUT that failed
        self._failing = 0  # failed PUTs in a row
        self._retry_at = 0.0
        self._kick = False  # a flush or close asks for a write now, backoff or not
        self._closed = False  # no more records
        self._stop = False  # the thread ends after its current PUT
        self._thread = threading.Thread(target=self._run, name="ledger", daemon=True)
        self._thread.start()

    @property
    def key(self) -> str:
        """The object of this boot's first segment."""
        return segment_key(self._store, self.boot_id)

    # -- recording ----------------------------------------------------------------------

    def record(self, event: str, /, **fields: Any) -> None:
        """Append one event (``t`` is now); returns at once, never raises."""
        try:
            self._append(self._line(event, self._clock(), fields))
        except Exception as exc:  # a value json cannot take, a clock that failed: drop it
            _log("warning", "ledger_event_dropped", ledger_event=event, error=str(exc))

    def boot(
        self,
        *,
        node_id: str | None,
        nodes: int,
        slot: int | None = None,
        metadata: MetadataReader | None = None,
        instance: InstanceFacts | None = None,
        price_usd_per_hour: float | None = None,
        uptime_s: float | None = None,
        version: str | None = None,
    ) -> None:
        """The boot event: record it first. ``instance`` gives the machine's facts; else
        they are read from ``metadata`` on the ledger's thread (never on the caller's).
        ``uptime_s`` defaults to this machine's (``/proc/uptime``)."""
        try:
            t = self._clock()
            base: dict[str, Any] = {
                "boot_id": self.boot_id,
                "run_id": self._store.run_id,
                "version": version if version is not None else _version(),
                "node_id": node_id,
                "slot": slot,
                "nodes": nodes,
                "price_usd_per_hour": price_usd_per_hour,
                "host_uptime_s": uptime_s if uptime_s is not None else host_uptime_s(),
            }

            def build() -> str:
                facts = instance
                if facts is None:
                    facts = instance_facts(metadata) if metadata is not None else InstanceFacts()
                fields = {
                    "boot_id": base["boot_id"],
                    "run_id": base["run_id"],
                    "version": base["version"],
                    "instance_id": facts.instance_id,
                    "instance_type": facts.instance_type,
                    "availability_zone": facts.availability_zone,
                    "lifecycle": facts.lifecycle,
                    "launched_at": facts.launched_at,
                    **{k: v for k, v in base.items() if k not in ("boot_id", "run_id", "version")},
                }
                return self._line("boot", t, fields)

            self._append(_Deferred(build) if instance is None else build())
        except Exception as exc:
            _log("warning", "ledger_event_dropped", ledger_event="boot", error=str(exc))

    def restore(self, *, step: int | None, bytes: int, seconds: float, downloaded: bool) -> None:
        self.record(
            "restore", step=step, bytes=bytes, seconds=round(seconds, 3), downloaded=downloaded
        )

    def standby(self, *, holders: Sequence[str | None] = ()) -> None:
        self.record("standby", holders=list(holders))

    def slot_taken(self, *, slot: int, how: str, handoff_seconds: float | None = None) -> None:
        self.record("slot_taken", slot=slot, how=how, handoff_seconds=_round(handoff_seconds))

    def train_start(self, *, step: int | None, attempt: int = 1) -> None:
        self.record("train_start", step=step, attempt=attempt)

    def first_step(self, *, step: int) -> None:
        self.record("first_step", step=step)

    def commit(
        self,
        *,
        step: int,
        reason: str,
        bytes: int,
        seconds: float,
        created_at: str | dt.datetime | None = None,
    ) -> None:
        self.record(
            "commit",
            step=step,
            reason=reason,
            bytes=bytes,
            seconds=round(seconds, 3),
            created_at=_when(created_at),
        )

    def notice(self, *, kind: str, action: str, deadline: dt.datetime | str | None) -> None:
        self.record("notice", kind=kind, action=action, deadline=_when(deadline))

    def stop(
        self, *, reason: str, committed_step: int | None, local_step: int | None = None
    ) -> None:
        self.record("stop", reason=reason, committed_step=committed_step, local_step=local_step)

    def exit(self, *, code: int) -> None:
        self.record("exit", code=code)

    # -- waiting ------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait until everything recorded so far is in storage: True; False when a write
        begun for it failed, or after ``timeout`` seconds, whichever comes first."""
        return self._wait_written(timeout)

    def close(self, timeout: float) -> bool:
        """Write what is left (one attempt, no backoff) and stop the thread; like
        :meth:`flush`, waits at most ``timeout`` seconds. Later records are dropped."""
        with self._cond:
            self._closed = True
        written = self._wait_written(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        return written

    def _wait_written(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            target = self._recorded
            started_before = self._attempts
            self._kick = True
            self._cond.notify_all()
            while self._durable() < target:
                if self._failed_attempt > started_before or self._stop:
                    return False  # the store refused a write made for this wait
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # -- the thread ---------------------------------------------------------------------

    def _line(self, event: str, t: dt.datetime, fields: Mapping[str, Any]) -> str:
        doc: dict[str, Any] = {"t": format_time(t), "event": event}
        doc.update((k, _finite(v)) for k, v in fields.items() if k not in doc)
        return json.dumps(doc, separators=(",", ":"), default=str) + "\n"

    def _append(self, line: str | _Deferred) -> None:
        size = len(line.encode()) if isinstance(line, str) else _DEFERRED_SIZE
        with self._cond:
            if self._closed:
                return  # after close: the boot's account is finished
            seg = self._segments[-1]
            if seg.lines and seg.size + size > self._max_bytes:
                seg.frozen = True
                seg = _Segment(seg.index + 1)
                self._segments.append(seg)
            seg.lines.append(line)
            seg.size += size
            self._recorded += 1
            self._cond.notify_all()

    def _durable(self) -> int:
        return self._durable_before + sum(s.written for s in self._segments)

    def _next_write(self) -> _Segment | None:
        """The first segment with unwritten lines (segments are written in order)."""
        return next((s for s in self._segments if s.written < len(s.lines)), None)

    def _run(self) -> None:
        # Nothing may end this thread but close(): not the store, not a log call that
        # raises (stdout gone late in a shutdown), not a bug in building a line.
        while True:
            try:
                if not self._write_next():
                    return
            except Exception as exc:
                _log("warning", "ledger_thread_error", error=f"{exc.__class__.__name__}: {exc}")
                time.sleep(_RETRY_S[0])

    def _write_next(self) -> bool:
        """Wait for lines to write, write one segment; False when the thread should end."""
        with self._cond:
            while True:
                if self._stop:
                    return False
                seg = self._next_write()
                wait = self._retry_at - time.monotonic()
                if seg is not None and (wait <= 0 or self._kick):
                    break
                self._cond.wait(wait if seg is not None else None)
            self._kick = False
            self._attempts += 1
            attempt = self._attempts
            lines = list(seg.lines)
        try:
            body = "".join(self._built(seg, lines)).encode()
            self._store.write_small(segment_key(self._store, self.boot_id, seg.index), body)
        except Exception as exc:  # StoreError, or anything else: never kill the thread
            self._failed(attempt, seg, exc)
        else:
            self._written(seg, len(lines))
        return True

    def _built(self, seg: _Segment, lines: list[str | _Deferred]) -> list[str]:
        """The segment's lines with deferred ones built (on this thread), kept built."""
        out: list[str] = []
        for i, line in enumerate(lines):
            if isinstance(line, _Deferred):
                try:
                    line = line.build()
                except Exception as exc:
                    _log("warning", "ledger_event_dropped", ledger_event="boot", error=str(exc))
                    line = ""
                with self._cond:
                    seg.lines[i] = line
            out.append(line)
        return out

    def _written(self, seg: _Segment, count: int) -> None:
        with self._cond:
            seg.written = max(seg.written, count)
            recovered = self._failing
            self._failing = 0
            self._retry_at = 0.0
            # A full segment in storage leaves memory; its lines stay counted.
            while (
                len(self._segments) > 1
                and self._segments[0].frozen
                and (self._segments[0].written == len(self._segments[0].lines))
            ):
                self._durable_before += self._segments.pop(0).written
            self._cond.notify_all()
        if recovered:  # logged outside the lock: a slow log never holds up record()
            _log("info", "ledger_write_recovered", key=self.key, failed_writes=recovered)

    def _failed(self, attempt: int, seg: _Segment, exc: Exception) -> None:
        with self._cond:
            self._failing += 1
            self._failed_attempt = attempt
            first = self._failing == 1
            delay = _RETRY_S[min(self._failing, len(_RETRY_S)) - 1]
            self._retry_at = time.monotonic() + delay
            self._cond.notify_all()
        if first:
            # Once per run of failures: a bucket that is gone would otherwise log at every
            # retry of every event, for the rest of the run.
            _log(
                "warning",
                "ledger_write_failed",
                key=segment_key(self._store, self.boot_id, seg.index),
                error=str(exc),
                why="the run goes on; the ledger retries with backoff",
            )


def _log(level: str, event: str, **fields: Any) -> None:
    """Log from the writer: a log call that fails (its stream closed) is dropped, never
    raised into the caller or the ledger's thread."""
    with contextlib.suppress(Exception):
        getattr(log, level)(event, **fields)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _version() -> str | None:
    try:
        from daemon import __version__
    except ImportError:
        return None
    return __version__
