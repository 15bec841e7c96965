"""The ledger's reader: every boot of a run back from storage, in order, as events.

Lines that are not events are skipped (one warning per object), and so is an object
that cannot be read; only a failed listing raises. Used by the report
(:mod:`daemon.report`), never on the run's path.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.ledger_format import (
    MAX_READ_BYTES,
    SEGMENT_NAME_RE,
    LedgerStore,
    ledger_prefix,
    parse_time,
)

log = structlog.get_logger(__name__)


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
        m = SEGMENT_NAME_RE.match(obj.key[len(prefix) :])
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
