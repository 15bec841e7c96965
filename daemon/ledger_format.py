"""The ledger's format: where its objects live, how a boot is named, how times are written.

Everything both sides of the ledger agree on, the writer (:mod:`daemon.ledger_writer`)
and the reader (:mod:`daemon.ledger_reader`): the keys (``<prefix>/<run_id>/ledger/
<boot-id>[.<n>].jsonl``), the boot id, the time format of every line, and what the ledger
needs of the run's store. The format itself (the events and their fields) is described
in :mod:`daemon.ledger`. No I/O here.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Sequence
from typing import Protocol

LEDGER_DIR = "ledger"
SUFFIX = ".jsonl"
MAX_SEGMENT_BYTES = 256 * 1024
# What a reader accepts per object: a segment is at most MAX_SEGMENT_BYTES plus one line;
# anything far larger was not written by us, and is not read into memory.
MAX_READ_BYTES = 4 * MAX_SEGMENT_BYTES
BOOT_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{4,32}$")
SEGMENT_NAME_RE = re.compile(r"^(?P<boot>[^./]+)(?:\.(?P<seg>[0-9]{1,6}))?\.jsonl$")


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
