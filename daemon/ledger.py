"""The run ledger: what every supervisor of a run did, one object per boot, in the run's storage.

A run lives through several instances (boots, notices, standby handoffs, several nodes).
To answer "what did spot cost me?" afterwards, each supervisor start (a *boot*) appends
its events to an object of its own::

    <remote>/<run.id>/ledger/<boot-id>.jsonl          the boot's events, one JSON per line
    <remote>/<run.id>/ledger/<boot-id>.<n>.jsonl      further segments of a long boot (n >= 1)

The boot id is ``<UTC start, %Y%m%dT%H%M%SZ>-<16 hex>``: listing order is boot order, and
no two boots share an object, so no instance ever writes another's (there is nothing to
lock, and a report can read the ledger while the run goes on). Object storage has no
append: the writer keeps the boot's lines in memory and rewrites the whole object on each
flush. An object holds at most ``max_segment_bytes`` (256 KiB); past that the writer
starts the next segment, so a boot that lives for weeks never rewrites megabytes, and
lines of a finished segment leave memory once written.

Every line is ``{"t": "<ISO 8601 UTC, milliseconds, Z>", "event": "<name>", ...fields}``.
The events and their fields (any field may be null when unknown; readers ignore
fields and events they do not know):

``boot``
    ``boot_id``, ``run_id``, ``version``; ``instance_id``, ``instance_type``,
    ``availability_zone``, ``lifecycle`` (``spot`` / ``on-demand``, from the metadata
    service's ``instance-life-cycle``); ``node_id``, ``slot``, ``nodes`` (run.nodes);
    ``price_usd_per_hour`` (the spot price, when the supervisor knows it);
    ``host_uptime_s`` (seconds since the machine booted: the report counts the instance
    from ``t - host_uptime_s``, since it is billed from before the supervisor starts).
``restore``
    ``step`` (restored; null: nothing committed yet), ``bytes``, ``seconds``,
    ``downloaded`` (false: a newer local checkpoint was kept).
``standby``
    ``holders`` (instance ids holding the slots): every slot was held; waiting.
``slot_taken``
    ``slot``, ``how`` (``free``, ``ours``, ``released``, ``expired``), ``handoff_seconds``.
``train_start``
    ``step`` (the step it resumes from), ``attempt``: the training command started.
``first_step``
    ``step``: the first new checkpoint the trainer wrote after a start (its ``t`` is
    when the supervisor saw it).
``commit``
    ``step``, ``reason``, ``bytes``, ``seconds`` (of the upload), ``created_at`` (the
    manifest's, when known: the work in the checkpoint is the work done until then).
``notice``
    ``kind`` (``interruption``, ``rebalance``, ``maintenance``, ``signal``), ``action``,
    ``deadline`` (the instance's, ISO UTC).
``stop``
    ``reason``, ``committed_step`` (the newest committed when training stopped),
    ``local_step`` (the newest complete local one; optional).
``exit``
    ``code``.

Writes are best effort and never in the caller's way: :meth:`RunLedger.record` only
appends in memory and wakes the ledger's own thread, which does every PUT (and the
metadata lookups of ``boot``). A PUT takes as long as the store's client allows (give
the ledger a store whose client has short timeouts and few attempts); whatever it does,
:meth:`RunLedger.flush` and :meth:`RunLedger.close` wait at most the seconds they are
given, and the thread is a daemon thread, so a hung PUT never holds up a drain or the
process's exit. A failed write is logged once (``ledger_write_failed``, a warning) per
run of failures, retried with backoff, and never raised: the ledger is an account of
the run, never a reason for it to fail.

:func:`read_ledger` reads every boot back, in order, skipping (with a warning) any line
that is not an event.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)

LEDGER_DIR = "ledger"
SUFFIX = ".jsonl"
MAX_SEGMENT_BYTES = 256 * 1024
# What a reader accepts per object: a segment is at most MAX_SEGMENT_BYTES plus one line;
# anything far larger was not written by us, and is not read into memory.
MAX_READ_BYTES = 4 * MAX_SEGMENT_BYTES
_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # backoff after 1, 2, ... failed writes in a row
_BOOT_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{4,32}$")
_KEY_NAME_RE = re.compile(r"^(?P<boot>[^./]+)(?:\.(?P<seg>[0-9]{1,6}))?\.jsonl$")

# The metadata service's paths for the boot event (IMDSv2; daemon.notices.imds serves them).
META_INSTANCE_ID = "/latest/meta-data/instance-id"
META_INSTANCE_TYPE = "/latest/meta-data/instance-type"
META_AVAILABILITY_ZONE = "/latest/meta-data/placement/availability-zone"
META_LIFECYCLE = "/latest/meta-data/instance-life-cycle"
META_IDENTITY_DOCUMENT = "/latest/dynamic/instance-identity/document"

# Notice kinds that take the instance away (a rebalance recommendation does not).
INTERRUPTING_KINDS = frozenset({"interruption", "maintenance"})


class _Location(Protocol):
    def key(self, *parts: str) -> str: ...

    def url(self, key: str = "") -> str: ...


class _Listed(Protocol):
    @property
    def key(self) -> str: ...


class LedgerStore(Protocol):
    """What the ledger needs of the run's store (``CheckpointStore`` has all of it)."""

    @property
    def location(self) -> _Location: ...

    @property
    def run_id(self) -> str: ...

    def write_small(
        self, key: str, body: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str: ...

    def read_small(self, key: str, max_bytes: int = ...) -> tuple[bytes, str] | None: ...

    def list_objects(self, prefix: str) -> Sequence[_Listed]: ...


class MetadataReader(Protocol):
    """The metadata service, as :class:`daemon.notices.imds.ImdsClient` serves it."""

    def get_text(self, path: str) -> str | None: ...


@dataclass(frozen=True)
class InstanceFacts:
    """What the boot event says about the machine; None where unknown."""

    instance_id: str | None = None
    instance_type: str | None = None
    availability_zone: str | None = None
    lifecycle: str | None = None
    # When the instance launched (AWS: the identity document's pendingTime): billing
    # starts there, before the supervisor does.
    launched_at: str | None = None


def instance_facts(metadata: MetadataReader) -> InstanceFacts:
    """The instance's id, type, zone and lifecycle from the metadata service.

    Blocking (four requests, each bounded by the client's timeouts); a value the
    service does not give (404, an error, a service that is not there) is None.
    """

    def get(path: str) -> str | None:
        try:
            text = metadata.get_text(path)
        except Exception as exc:  # MetadataUnavailable, or anything a stand-in raises
            log.debug("ledger_metadata_unavailable", path=path, error=str(exc))
            return None
        return text.strip() or None if text is not None else None

    return InstanceFacts(
        instance_id=get(META_INSTANCE_ID),
        instance_type=get(META_INSTANCE_TYPE),
        availability_zone=get(META_AVAILABILITY_ZONE),
        lifecycle=get(META_LIFECYCLE),
        launched_at=_pending_time(get(META_IDENTITY_DOCUMENT)),
    )


def _pending_time(document: str | None) -> str | None:
    """``pendingTime`` of the instance identity document (None if absent or garbled)."""
    if document is None:
        return None
    try:
        doc = json.loads(document)
    except ValueError:
        return None
    value = doc.get("pendingTime") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and parse_time(value) is not None else None


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def format_time(t: dt.datetime) -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``: events a few ms apart keep their order."""
    t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_time(value: object) -> dt.datetime | None:
    """An ISO 8601 time as an aware UTC datetime (naive means UTC); None if not one."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"  # fromisoformat takes a Z only from Python 3.11
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def new_boot_id(now: dt.datetime | None = None) -> str:
    """``20261201T223000Z-<16 hex>``: sorts by start time, unique without coordination."""
    start = (now or utc_now()).astimezone(dt.timezone.utc)
    return f"{start:%Y%m%dT%H%M%SZ}-{secrets.token_hex(8)}"


def ledger_prefix(store: LedgerStore) -> str:
    """``<prefix>/<run_id>/ledger/``."""
    return store.location.key(store.run_id, LEDGER_DIR) + "/"


def segment_key(store: LedgerStore, boot_id: str, segment: int = 0) -> str:
    """The key of one segment of a boot's ledger (segment 0 has no number)."""
    name = f"{boot_id}{SUFFIX}" if segment == 0 else f"{boot_id}.{segment:04d}{SUFFIX}"
    return ledger_prefix(store) + name


def host_uptime_s(path: Path = Path("/proc/uptime")) -> float | None:
    """Seconds since this machine booted (Linux), None where that cannot be read."""
    try:
        return round(float(path.read_text().split()[0]), 3)
    except (OSError, ValueError, IndexError):
        return None


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
        if not _BOOT_ID_RE.match(self.boot_id):
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


# -- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEvent:
    """One line of a boot's ledger."""

    t: dt.datetime
    name: str
    fields: Mapping[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


@dataclass
class Boot:
    """One supervisor start and its events, in the order it recorded them."""

    boot_id: str
    events: list[LedgerEvent]
    keys: list[str] = field(default_factory=list)
    skipped_lines: int = 0

    def all(self, name: str) -> list[LedgerEvent]:
        return [e for e in self.events if e.name == name]

    def first(self, name: str) -> LedgerEvent | None:
        return next((e for e in self.events if e.name == name), None)

    def last(self, name: str) -> LedgerEvent | None:
        return next((e for e in reversed(self.events) if e.name == name), None)

    @property
    def info(self) -> Mapping[str, Any]:
        """The boot event's fields ({} if its boot line is missing)."""
        ev = self.first("boot")
        return ev.fields if ev is not None else {}

    @property
    def start(self) -> dt.datetime:
        ev = self.first("boot")
        return ev.t if ev is not None else self.events[0].t

    @property
    def end(self) -> dt.datetime:
        return max(e.t for e in self.events)

    @property
    def exited(self) -> bool:
        """Whether the supervisor recorded an orderly end (``exit``)."""
        return self.first("exit") is not None


def parse_lines(raw: bytes, where: str) -> tuple[list[LedgerEvent], int]:
    """The events of one ledger object, and how many lines were skipped as garbage."""
    events: list[LedgerEvent] = []
    skipped = 0
    first_why: str | None = None
    for number, text in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        why = None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            why = f"line {number}: not JSON ({exc.__class__.__name__})"
        else:
            if not isinstance(doc, dict):
                why = f"line {number}: not an object"
            elif not isinstance(doc.get("event"), str) or not doc["event"]:
                why = f"line {number}: no event name"
            elif (t := parse_time(doc.get("t"))) is None:
                why = f"line {number}: no ISO time in t"
            else:
                fields = {k: v for k, v in doc.items() if k not in ("t", "event")}
                events.append(LedgerEvent(t, doc["event"], fields))
        if why is not None:
            skipped += 1
            first_why = first_why or why
    if skipped:
        # One warning per object: a garbage object must not flood the log line by line.
        log.warning("ledger_lines_skipped", where=where, skipped=skipped, first=first_why)
    return events, skipped


def read_ledger(store: LedgerStore, *, max_bytes: int = MAX_READ_BYTES) -> list[Boot]:
    """Every boot's events, boots in start order. Garbage lines are skipped (warning);
    an object that cannot be read is skipped (warning); a failed listing raises."""
    prefix = ledger_prefix(store)
    segments: dict[str, list[tuple[int, str]]] = {}
    for obj in store.list_objects(prefix):
        m = _KEY_NAME_RE.match(obj.key[len(prefix) :])
        if m is None:
            continue  # not a ledger object (a folder marker, someone's notes)
        segments.setdefault(m["boot"], []).append((int(m["seg"] or 0), obj.key))
    boots: list[Boot] = []
    for boot_id, parts in segments.items():
        boot = Boot(boot_id, [])
        for _, key in sorted(parts):
            try:
                got = store.read_small(key, max_bytes)
            except Exception as exc:  # too large, access denied for one object, ...
                log.warning("ledger_object_unreadable", key=key, error=str(exc))
                continue
            if got is None:
                continue  # deleted between the listing and the read
            events, skipped = parse_lines(got[0], store.location.url(key))
            boot.events.extend(events)
            boot.keys.append(key)
            boot.skipped_lines += skipped
        if boot.events:
            boots.append(boot)
    boots.sort(key=lambda b: (b.start, b.boot_id))
    return boots
