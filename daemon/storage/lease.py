"""Slots: who may train the run (CONTRACT §7, issue 13).

A run has ``run.nodes`` slots; a supervisor starts the training command only while it
holds one. Each slot is one small object in the run's storage::

    <remote>/<run.id>/leases/slot-<k>.json
    {"node_id", "instance_id", "boot_id", "boot_time", "heartbeat", "renewals",
     "released_at", "committed_step"}

* **Take** a free slot with ``If-None-Match: *`` (no object yet), or replace a released
  or expired one with ``If-Match: <the ETag we read>``. A slot that names this
  instance (``instance_id`` and ``node_id``: the same machine, restarted by systemd)
  is ours again at once.
* **Renew** every ``ttl / 6`` seconds with ``If-Match`` on the ETag of our last write (the
  body changes each time, so the ETag does). A 412 means someone took the slot over.
* **Expire.** Wall clocks of two machines do not agree, so nobody compares the
  heartbeat's time with its own clock: a slot is expired when its ETag has not changed
  for ``ttl`` seconds *as the observer has watched it* (its monotonic clock). A standby
  watching the slot takes over a vanished holder's within ``ttl`` plus one poll; one
  that boots later watches for ``ttl`` first.
* **Release** (after the emergency commit, the completion, an orderly stop): the slot is
  rewritten as released, with the time and the committed step, so the standby that
  takes it can log the handoff.

The lease decides who may *start* training, nothing more: a holder that cannot renew
(S3 unreachable) keeps training and keeps trying.

The honest limit: on a store whose conditional writes are not atomic (moto; some
S3-compatible servers), two standbys replacing one expired or released slot can both
see their write accepted. After each take the winner reads the slot back a moment later
and only then starts; the loser sees the other's holder and goes back to waiting. What
is left is two writes landing within one read-back window of each other, and then the
second writer's first renewal (at most ``ttl / 6`` later) fails with a 412, which it
logs as ``lease_lost``. Two trainers for one slot would write the same checkpoints of
one deterministic run: both commits are valid, the first one committed stays.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from daemon.storage.s3client import StoreError
from daemon.storage.store import CheckpointStore

log = structlog.get_logger(__name__)

LEASES_DIR = "leases"
DEFAULT_LEASE_TTL_S = 30.0
# After a take, wait this long and read the slot back before believing it is ours.
CONFIRM_DELAY_S = 0.5
_PRECONDITION = ("PreconditionFailed", "ConditionalRequestConflict", "412")


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: Any) -> dt.datetime | None:
    """An ISO time from a lease body (None if it is not one)."""
    if not isinstance(text, str):
        return None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class Identity:
    """Who is asking: this node, on this instance, in this boot."""

    node_id: str
    instance_id: str
    boot_id: str
    boot_time: str

    @classmethod
    def this_boot(cls, node_id: str, instance_id: str) -> Identity:
        return cls(node_id, instance_id, os.urandom(8).hex(), _now_iso())

    def same_machine(self, doc: dict[str, Any]) -> bool:
        return doc.get("instance_id") == self.instance_id and doc.get("node_id") == self.node_id


@dataclass(frozen=True)
class Taken:
    """A slot this supervisor now holds, and how it got it."""

    slot: int
    how: str  # "free", "ours", "released", "expired"
    previous: dict[str, Any] | None  # the body it replaced


class Leases:
    """The run's slots, from one supervisor's point of view."""

    def __init__(
        self,
        store: CheckpointStore,
        slots: int,
        me: Identity,
        ttl: float = DEFAULT_LEASE_TTL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._slots = slots
        self.me = me
        self.ttl = ttl
        self._clock = clock
        self._prefix = store.location.key(store.run_id, LEASES_DIR) + "/"
        self._lock = threading.Lock()
        self.slot: int | None = None
        self._etag: str | None = None
        self._renewals = 0
        # Per slot: the ETag last seen and since when (our clock): expiry by observation.
        self._seen: dict[int, tuple[str, float]] = {}

    def key(self, slot: int) -> str:
        return f"{self._prefix}slot-{slot}.json"

    # --- taking ---------------------------------------------------------------------

    def try_acquire(self) -> Taken | None:
        """Take a slot if one is free, ours, released or expired; None when all are held."""
        for slot in range(self._slots):
            taken = self._try_slot(slot)
            if taken is not None:
                return taken
        return None

    def _try_slot(self, slot: int) -> Taken | None:
        current = self._store.read_small(self.key(slot))
        etag: str | None = None
        previous: dict[str, Any] | None = None
        how = "free"
        if current is not None:
            body, etag = current
            previous = _parse(body)
            takeable = self._takeable(slot, previous, etag)
            if takeable is None:
                return None
            how = takeable
        if not self._write(slot, self._body(), if_match=etag, create=current is None):
            return None
        if not self._confirm(slot):
            return None
        log.info(
            "lease_taken",
            slot=slot,
            how=how,
            node_id=self.me.node_id,
            previous_holder=(previous or {}).get("instance_id"),
        )
        return Taken(slot, how, previous)

    def _takeable(self, slot: int, doc: dict[str, Any], etag: str) -> str | None:
        if self.me.same_machine(doc):
            return "ours"
        if doc.get("released_at"):
            return "released"
        seen = self._seen.get(slot)
        now = self._clock()
        if seen is None or seen[0] != etag:
            self._seen[slot] = (etag, now)  # (re)start watching it
            return None
        return "expired" if now - seen[1] >= self.ttl else None

    def _confirm(self, slot: int) -> bool:
        """Read the slot back a moment after taking it: on a store whose conditional
        writes are not atomic, a racing writer may have replaced ours."""
        time.sleep(CONFIRM_DELAY_S)
        back = self._store.read_small(self.key(slot))
        doc = _parse(back[0]) if back is not None else {}
        if doc.get("boot_id") != self.me.boot_id:
            log.warning("lease_race_lost", slot=slot, holder=doc.get("instance_id"))
            with self._lock:
                self.slot, self._etag = None, None
            return False
        with self._lock:
            self._etag = back[1] if back is not None else self._etag
        return True

    # --- holding --------------------------------------------------------------------

    def renew(self) -> bool:
        """One heartbeat; False when it failed (the lease stays ours to try again)."""
        with self._lock:
            slot, etag = self.slot, self._etag
        if slot is None:
            return False
        try:
            return self._write(slot, self._body(), if_match=etag, create=False)
        except StoreError as exc:
            log.warning("lease_renew_failed", slot=slot, error=str(exc))
            return False

    def release(self, committed_step: int | None) -> None:
        """Give the slot up (after the emergency commit, the completion, a stop)."""
        with self._lock:
            slot, etag = self.slot, self._etag
        if slot is None:
            return
        body = self._body(released_at=_now_iso(), committed_step=committed_step)
        try:
            if self._write(slot, body, if_match=etag, create=False):
                log.info("lease_released", slot=slot, committed_step=committed_step)
        except StoreError as exc:
            # Not fatal: the slot expires after the TTL and a standby takes it then.
            log.warning("lease_release_failed", slot=slot, error=str(exc))
        with self._lock:
            self.slot, self._etag = None, None

    def holder(self, slot: int) -> dict[str, Any] | None:
        got = self._store.read_small(self.key(slot))
        return _parse(got[0]) if got is not None else None

    # --- writing --------------------------------------------------------------------

    def _body(self, **extra: Any) -> bytes:
        self._renewals += 1
        doc = {
            "node_id": self.me.node_id,
            "instance_id": self.me.instance_id,
            "boot_id": self.me.boot_id,
            "boot_time": self.me.boot_time,
            "heartbeat": _now_iso(),
            "renewals": self._renewals,
            "released_at": None,
            "committed_step": None,
            **extra,
        }
        return (json.dumps(doc, indent=1) + "\n").encode()

    def _write(self, slot: int, body: bytes, *, if_match: str | None, create: bool) -> bool:
        try:
            etag = self._store.write_small(
                self.key(slot), body, if_match=if_match, if_none_match=create
            )
        except StoreError as exc:
            if exc.code in _PRECONDITION or exc.code == "NoSuchKey":
                with self._lock:
                    lost = self.slot == slot and not create
                    if lost:
                        self.slot, self._etag = None, None
                if lost:
                    log.error("lease_lost", slot=slot, why="another instance replaced it")
                return False
            raise
        with self._lock:
            self.slot, self._etag = slot, etag
        return True


def _parse(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


class Heartbeat:
    """Renews the held lease every ``ttl / 6`` seconds on a thread of its own."""

    def __init__(self, leases: Leases) -> None:
        self._leases = leases
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        every = max(self._leases.ttl / 6, 0.5)
        while not self._stop.wait(every):
            try:
                self._leases.renew()
            except Exception:  # never let the heartbeat die: the next one may work
                log.exception("lease_heartbeat_failed")
