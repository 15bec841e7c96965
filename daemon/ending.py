"""How a run ends, whichever way it ends: the steps the drain and the trainer's exits share.

The final flush (off the main loop, which keeps systemd's watchdog fed meanwhile); the
slot this instance holds, its heartbeat and its release, which comes only after the
last commit (a standby, or a replacement, may take it then); the last phase; and, at
exit, the sync and the store closed unless a flush is still stuck on the network past
the deadline (it is left behind).

What must not live here: deciding which way the run ends (:mod:`daemon.policy`), the
drain's clock (:mod:`daemon.drain`), the restarts (:mod:`daemon.exits`).
"""

from __future__ import annotations

from typing import Any

import structlog

from daemon.loop import MainLoop
from daemon.sdnotify import Notifier
from daemon.state import Phase, StateMachine
from daemon.storage.lease import Heartbeat, Leases
from daemon.storage.store import CheckpointStore
from daemon.storage.sync import CheckpointSync, FlushHandle

log = structlog.get_logger(__name__)


class Ending:
    """The run's last steps, for one supervisor; the slot is given to it at boot."""

    def __init__(
        self,
        sync: CheckpointSync,
        store: CheckpointStore,
        state: StateMachine,
        notifier: Notifier,
        loop: MainLoop,
    ) -> None:
        self._sync, self._store, self._state = sync, store, state
        self._notifier, self._loop = notifier, loop
        # The last flush started: one still running at exit is stuck on the network.
        self.flush: FlushHandle | None = None
        self._leases: Leases | None = None
        self._heartbeat: Heartbeat | None = None

    # --- the slot ------------------------------------------------------------------------

    def hold_slot(self, leases: Leases) -> None:
        """A slot is ours (taken at boot, or in standby): keep its lease alive."""
        self._leases = leases
        self._heartbeat = Heartbeat(leases)
        self._heartbeat.start()

    @property
    def slot(self) -> int | None:
        """The slot held (None: none yet)."""
        return self._leases.slot if self._leases is not None else None

    def release_slot(self, committed: int | None) -> None:
        """After the emergency commit, the completion or an orderly stop: free the slot
        for a standby (off the main loop: it is S3 I/O)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        leases = self._leases
        if leases is not None:
            self._loop.off_loop(lambda: leases.release(committed), "lease-release")

    # --- the last commit and the last phase -------------------------------------------------

    def final_flush(self, why: str, wait_global_s: float = 0.0) -> int | None:
        """A final flush off the main loop, which keeps systemd's watchdog fed meanwhile."""
        flush = self.flush = self._sync.flush_async(wait_global_s)
        self._loop.wait_done(flush)
        if flush.error is not None:
            log.error("final_flush_failed", why=why, error=flush.error)
        return flush.committed

    def track_flush(self, flush: FlushHandle) -> None:
        """The emergency flush (:mod:`daemon.drain`): at exit, one still running is left
        behind."""
        self.flush = flush

    def done(self, why: str, **fields: Any) -> None:
        """The run ended in order (phase ``done``)."""
        self._state.transition(Phase.DONE, why, **fields)
        self._notifier.stopping("done")

    def failed(self, why: str) -> None:
        """The run ended in failure (phase ``failed``)."""
        self._state.transition(Phase.FAILED, why)
        self._notifier.stopping("failed")

    def close(self) -> None:
        """At exit: the heartbeat stops; the sync and the store close, unless a flush is
        still stuck on the network past the deadline (it is left behind)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self.flush is None or self.flush.done.is_set():
            self._sync.stop()
            self._store.close()
