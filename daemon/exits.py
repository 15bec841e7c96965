"""The trainer ended without our signal, or hung: what follows, as daemon.policy says.

What a trainer's exit means is decided here (by :func:`daemon.policy.on_trainer_exit`),
and never from its exit code alone:

* exit 0 with a newest checkpoint of reason ``final``: the run is finished; commit it,
  then write ``complete.json``;
* exit 0 after any other save: someone else stopped it (an operator's ``kill``, a peer
  rank's stop under torchrun); commit what it saved and start it again;
* anything else: a crash; kill what is left of its tree, back off, restart.

A trainer alive but without a new checkpoint within ``daemon.progress_timeout`` is a
crash too, once its tree is killed. :class:`Restarts` keeps the crashes of the window
and the time of the next start. What must not live here: the drain (our own SIGTERM,
:mod:`daemon.drain`), and any "what now?" of its own (those are :mod:`daemon.policy`'s).
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog

from daemon import layout
from daemon.child import ExitStatus, TrainerProcess
from daemon.ending import Ending
from daemon.ledger import RunLedger
from daemon.loop import MainLoop
from daemon.nodes import FINAL_COMMIT_WAIT_S, MultiNode
from daemon.policy import Step, backoff_s, on_backoff_over, on_crash, on_hang, on_trainer_exit
from daemon.progress import ProgressWatch, newest_local_checkpoint
from daemon.state import Phase, StateMachine
from daemon.storage.store import CheckpointStore
from daemon.storage.sync import CheckpointSync, FlushHandle

log = structlog.get_logger(__name__)


class Restarts:
    """When the trainer starts again: the crashes within ``daemon.restart_window``, the
    backoff, and (several nodes) the rejoin with the global commit that must end first."""

    def __init__(self, window: float, max_restarts: int, nodes: MultiNode | None) -> None:
        self.window, self._max_restarts, self._nodes = window, max_restarts, nodes
        self._failures: list[float] = []
        self.at: float | None = None  # monotonic time of the next start
        self._rejoin: FlushHandle | None = None

    def after_crash(self) -> float | None:
        """Count a crash: the backoff before the next start, or None: give up."""
        now = time.monotonic()
        self._failures = [t for t in self._failures if now - t < self.window] + [now]
        if on_crash(failures=self.failures, max_restarts=self._max_restarts) is Step.GIVE_UP:
            return None
        backoff = backoff_s(self.failures)
        self.at = now + backoff
        self._start_rejoin(None)
        return backoff

    @property
    def failures(self) -> int:
        """Crashes within the window, the newest included."""
        return len(self._failures)

    def immediately(self, wait_for_step: int) -> None:
        """Start again at once; several nodes: once this step's global commit is in."""
        self.at = time.monotonic()
        # Several nodes: a peer stopped us, and is committing its part of this step.
        self._start_rejoin(wait_for_step)

    def due(self) -> Step | None:
        """None until the backoff is over and any rejoin ended; then what now
        (:func:`daemon.policy.on_backoff_over`): START (the schedule is cleared) or CRASH."""
        if self.at is None or time.monotonic() < self.at:
            return None
        if self._rejoin is not None and not self._rejoin.done.is_set():
            return None
        step = on_backoff_over(rejoin_failed=bool(self._rejoin and self._rejoin.error))
        if step is Step.START:
            self.at = None
            self._rejoin = None
        return step

    @property
    def rejoin_error(self) -> str | None:
        return self._rejoin.error if self._rejoin is not None else None

    def _start_rejoin(self, wait_for_step: int | None) -> None:
        """Several nodes: before the next start, align with the global commit (a thread)."""
        nodes = self._nodes
        if nodes is None:
            return

        def rejoin() -> None:
            nodes.rejoin(wait_for_step)

        self._rejoin = FlushHandle(rejoin, name="rejoin")


class TrainerExits:
    """Acts on the trainer's own end (or its hang): complete, restart, or give up.

    Each method returns the supervisor's exit code, or None: the loop goes on (in
    ``backoff``, until :meth:`Restarts.due`).
    """

    def __init__(
        self,
        ending: Ending,
        restarts: Restarts,
        progress: ProgressWatch,
        ledger: RunLedger,
        *,
        store: CheckpointStore,
        sync: CheckpointSync,
        state: StateMachine,
        loop: MainLoop,
        local_dir: Path,
        several_nodes: bool,
    ) -> None:
        self._ending, self._restarts, self._progress = ending, restarts, progress
        self._ledger = ledger
        self._store, self._sync, self._state, self._loop = store, sync, state, loop
        self._local_dir, self._several_nodes = local_dir, several_nodes

    def exited(self, child: TrainerProcess, status: ExitStatus) -> int | None:
        """The trainer ended without our signal: finished, stopped by someone else, or crashed.

        Whatever it left running (data-loader workers, torchrun's ranks, a shell's
        children) is killed and reaped first, so a restart never runs beside it.
        """
        child.kill_leftovers()
        newest = newest_local_checkpoint(self._local_dir) if status.success else None
        progressed = newest is not None and self._progress.progressed(newest[0])
        step = on_trainer_exit(
            success=status.success,
            newest_reason=newest[1].reason if newest is not None else None,
            progressed=progressed,
        )
        if newest is None or step in (Step.COMPLETE, Step.CONFIG_ERROR):
            # A crash; or the run's end (COMPLETE), or no checkpoint at all (exit 2).
            return self.crashed(status.describe()) if step is Step.CRASH else self._complete()
        return self._stopped_elsewhere(newest[0], newest[1], step is Step.RESTART_NOW)

    def _stopped_elsewhere(
        self, step: int, manifest: layout.Manifest, progressed: bool
    ) -> int | None:
        """Exit 0 after a save that is not ``final``: an operator's ``kill``, a peer rank's
        stop. The run is not finished: commit what it saved (the background sync does),
        and start it again to resume. Not a crash, unless it got nowhere since its start:
        a command that keeps exiting 0 without training must not loop forever."""
        log.warning(
            "trainer_stopped_elsewhere",
            step=step,
            reason=manifest.reason,
            progressed=progressed,
            why="the trainer exited 0 after a save that is not final: someone else stopped it",
        )
        self._sync.wake()
        if not progressed:
            return self.crashed(f"exited 0 at step {step} ({manifest.reason}) without progress")
        self._state.update(child_pid=None)
        self._restarts.immediately(step)
        self._state.transition(Phase.BACKOFF, "trainer stopped elsewhere", backoff_s=0.0, step=step)
        return None

    def _complete(self) -> int:
        """The trainer finished the run: commit the ``final`` checkpoint, then complete.json."""
        self._state.update(child_pid=None)
        self._state.transition(Phase.UPLOADING, "training command finished")
        committed = self._ending.final_flush(
            "run complete", wait_global_s=FINAL_COMMIT_WAIT_S if self._several_nodes else 0.0
        )
        newest = newest_local_checkpoint(self._local_dir)
        if newest is None:
            # The command honoured nothing of the checkpoint contract; a restart would only
            # train again from scratch, so this is a configuration error (exit 2).
            log.error(
                "final_checkpoint_missing",
                local_dir=str(self._local_dir),
                hint="the training command exited 0 without writing a checkpoint "
                "into $SPOT_CHECKPOINT_DIR",
            )
            self._ending.failed("no checkpoint to commit")  # STOPPING=1, as every failure
            return 2
        newest_local = newest[0]
        if committed != newest_local:
            # The final checkpoint is on disk but not in the bucket (S3 down, throttled,
            # denied): exit 1, and systemd's restart commits it on the next boot.
            log.error("final_commit_failed", newest_local_step=newest_local, committed=committed)
            self._ending.failed("final checkpoint not committed")
            return 1
        write = lambda: self._store.write_complete(newest_local)  # noqa: E731
        marker = self._loop.off_loop(write, "complete.json")
        if marker.error is not None:
            log.error("complete_marker_failed", error=marker.error)
            self._ending.failed("complete.json not written")
            return 1
        log.info("run_completed", step=newest_local)
        self._ledger.stop(reason="complete", committed_step=newest_local)
        self._ending.release_slot(newest_local)
        self._ending.done("run complete", step=newest_local)
        return 0

    def hung(self, child: TrainerProcess, quiet: float) -> int | None:
        """A trainer alive but making no progress (a collective that never returns, a
        stuck data loader): kill its tree and treat it as a crash. It is not asked to
        save first: a hung loop reaches no step boundary, and its newest checkpoint is
        what a restart resumes from anyway."""
        log.error(
            "trainer_hung",
            pid=child.pid,
            seconds_without_checkpoint=round(quiet, 1),
            progress_timeout=self._progress.timeout,
            newest_local_step=self._progress.step,
        )
        child.kill_tree("no new checkpoint within daemon.progress_timeout")
        assert on_hang() is Step.CRASH
        return self.crashed(f"hung: no new checkpoint in {quiet:.0f}s")

    def crashed(self, why: str) -> int | None:
        """A trainer that failed without our signal: restart with backoff, or give up."""
        self._state.update(child_pid=None)
        backoff = self._restarts.after_crash()
        if backoff is None:
            failures, window = self._restarts.failures, self._restarts.window
            return self.give_up(f"trainer failed {failures} times in {window:g}s ({why})")
        restarts = self._state.snapshot().restarts + 1
        self._state.update(restarts=restarts)
        self._state.transition(
            Phase.BACKOFF, f"trainer {why}", backoff_s=backoff, restarts=restarts
        )
        return None

    def give_up(self, why: str) -> int:
        """Commit what is complete, then exit non-zero with a clear final event."""
        committed = self._ending.final_flush("giving up")
        log.error("supervisor_gave_up", why=why, committed_step=committed)
        self._ending.failed(why)
        return 1
