"""Standby: a healthy supervisor that holds none of the run's slots (CONTRACT §7).

It has restored the newest commit and waits: every :data:`STANDBY_POLL_S` seconds it
looks for the run's completion by another instance and tries to take a slot. Nothing of
the run is aborted, deleted or written meanwhile (no sync, no retention, no multipart
cleanup; only reads, and the attempts to take a slot). A notice or a stop ends it like
any other instance. When it takes a slot, the supervisor restores what was committed
since and starts the trainer; :func:`log_handoff` records how long that took.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import structlog

from daemon.loop import MainLoop
from daemon.policy import Step, on_standby_poll
from daemon.sdnotify import Notifier
from daemon.state import Phase, StateMachine
from daemon.storage.lease import Leases, Taken, parse_time
from daemon.storage.store import CheckpointStore, RestoreResult

log = structlog.get_logger(__name__)

STANDBY_POLL_S = 1.5
"""How often a standby looks for a free slot (and for the run's completion elsewhere)."""

StopCheck = Callable[[], "tuple[str, str, dt.datetime] | None"]


class Standby:
    """Waits for a slot; the supervisor's parts it needs, and nothing else."""

    def __init__(
        self,
        leases: Leases,
        store: CheckpointStore,
        state: StateMachine,
        notifier: Notifier,
        loop: MainLoop,
        slots: int,
    ) -> None:
        self._leases, self._store, self._state = leases, store, state
        self._notifier, self._loop, self._slots = notifier, loop, slots
        self._seen: Taken | str | None = None

    def wait(
        self,
        pending_stop: StopCheck,
        exit_code_after: Callable[[str], int],
        tick: Callable[[], None] = lambda: None,
    ) -> Taken | int:
        """Until a slot is taken (returned), or an exit code: a notice or stop, or the
        run completed by another instance. ``tick`` runs every turn (the metrics)."""
        holders = [self._leases.holder(k) for k in range(self._slots)]
        self._state.transition(
            Phase.STANDBY,
            "every slot is held by another instance",
            holders=[(h or {}).get("instance_id") for h in holders],
        )
        self._notifier.ready("standby: another instance holds every slot")
        while True:
            self._loop.ping_watchdog()
            tick()
            stop = pending_stop()
            if stop is not None:
                action, source, _deadline = stop
                log.info("standby_stopped", action=action, source=source)
                self._state.transition(Phase.DONE, f"{action} from {source} in standby")
                self._notifier.stopping("done")
                return exit_code_after(source)
            poll = self._loop.off_loop(self._poll, "standby-poll")
            if poll.error is not None:
                log.warning("standby_poll_failed", error=poll.error)
            else:
                step = on_standby_poll(
                    complete=self._seen == "complete", took_slot=isinstance(self._seen, Taken)
                )
                if step is Step.EXIT_DONE:
                    log.info("run_completed_elsewhere")
                    self._state.transition(Phase.DONE, "run completed by another instance")
                    self._notifier.stopping("done")
                    return 0
                if step is Step.TAKE_SLOT and isinstance(self._seen, Taken):
                    taken = self._seen
                    self._state.transition(Phase.RESTORING, f"took slot {taken.slot} ({taken.how})")
                    return taken
            self._loop.wait(STANDBY_POLL_S)

    def _poll(self) -> None:
        """One look: the run finished elsewhere, or a slot to take."""
        self._seen = None
        if self._store.read_complete() is not None:
            self._seen = "complete"
            return
        self._seen = self._leases.try_acquire()


def log_handoff(taken: Taken, restored: RestoreResult | None) -> float | None:
    """``slot_handoff``: from the holder's release (right after its emergency commit) to
    our trainer's start, which follows this line; and the restore's share of it. The
    handoff's seconds (None when the slot was not released by a holder)."""
    released = parse_time((taken.previous or {}).get("released_at"))
    fields: dict[str, Any] = {
        "slot": taken.slot,
        "how": taken.how,
        "restored_step": restored.step if restored is not None else None,
        "restore_seconds": round(restored.seconds, 3) if restored is not None else None,
    }
    if released is not None:
        since = (dt.datetime.now(dt.timezone.utc) - released).total_seconds()
        fields["handoff_seconds"] = round(max(since, 0.0), 3)
    log.info("slot_handoff", **fields)
    handoff: float | None = fields.get("handoff_seconds")
    return handoff
