"""Atomic, verified, signal-aware checkpoints for a PyTorch training loop (CONTRACT §3, §4).

:class:`CheckpointManager` is the library's public face: ``restore`` at the start,
``step_done`` at every step boundary. This module holds its training-loop half: the
SIGTERM / SIGUSR1 handlers (:mod:`trainer.signals`), the decision at each boundary
(:mod:`trainer.schedule`) and the stop. Saving and loading are its store's
(:class:`trainer.store.CheckpointStore`, the base class). Loading walks checkpoints
newest first, verifies every hash, and reads each file with
``torch.load(weights_only=True)``; a checkpoint that fails either is skipped with a
warning and the next older one is used (:mod:`trainer.loading`).

Saving is asynchronous by default: at a periodic or requested save the training
thread only copies the state into CPU memory (:mod:`trainer.snapshot`) and a
background thread writes it. At most one save is in flight: a save due while another
is being written waits for it (saves are never skipped, so which steps have a
checkpoint does not depend on disk speed). The save made because the loop stops
(SIGTERM, or the final step) is written at once and waited for, and so is any save in
flight, before :meth:`CheckpointManager.step_done` returns True.

For loops the manager does not drive (``transformers.Trainer``, Lightning, Accelerate;
:mod:`trainer.integrations`), :meth:`CheckpointManager.decide` is the step-boundary
decision alone, and :meth:`CheckpointManager.save_directory` commits a directory another
library wrote (in a ``.tmp-staging-step-*`` directory, or its own output directory) by
renaming it into a ``.tmp-step-*`` one, hashing it and writing the manifest last: the
same layout, no byte copied (one node; :mod:`trainer.staging`).

The names other modules define and code imports from here (``Checkpoint``, ``Resume``,
``Boundary``, ``newest_verified``, ``CHECKPOINT_DIR_ENV`` ...) stay importable from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from daemon.layout import Manifest
from trainer import schedule, state
from trainer.errors import CheckpointError
from trainer.loading import newest_verified
from trainer.localdir import STAGING_PREFIX
from trainer.schedule import SAVE_TIME_FACTOR, Boundary
from trainer.signals import SignalFlags

# trainer.state's names, importable from here as before the split (explicit re-exports).
from trainer.state import CHECKPOINT_DIR_ENV as CHECKPOINT_DIR_ENV
from trainer.state import DEFAULT_RUN_ID as DEFAULT_RUN_ID
from trainer.state import DEFAULT_SHARD_BYTES as DEFAULT_SHARD_BYTES
from trainer.state import FILE_SUFFIX as FILE_SUFFIX
from trainer.state import PROGRESS_KEY as PROGRESS_KEY
from trainer.state import RNG_KEY as RNG_KEY
from trainer.state import RUN_ID_ENV as RUN_ID_ENV
from trainer.state import Checkpoint as Checkpoint
from trainer.state import Resume as Resume
from trainer.state import Stateful as Stateful
from trainer.store import CheckpointStore

__all__ = [
    "CHECKPOINT_DIR_ENV",
    "DEFAULT_RUN_ID",
    "DEFAULT_SHARD_BYTES",
    "FILE_SUFFIX",
    "PROGRESS_KEY",
    "RNG_KEY",
    "RUN_ID_ENV",
    "SAVE_TIME_FACTOR",
    "STAGING_PREFIX",
    "Boundary",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointStore",
    "Resume",
    "Stateful",
    "newest_verified",
]

log = logging.getLogger(state.LOGGER)


class CheckpointManager(CheckpointStore):
    """Saves and restores a training run's state in ``$SPOT_CHECKPOINT_DIR``.

    Typical use::

        ckpt = CheckpointManager(save_every=100)
        resume = ckpt.restore(model, optimizer, scheduler)
        step = resume.step
        while not ckpt.step_done(step, final=step == total_steps):
            train_one_step()
            step += 1

    :meth:`step_done` is the one call per step boundary: it saves every ``save_every``
    steps, on SIGUSR1, on SIGTERM and at the final step, and returns True when the
    loop should end (after the final step, or after SIGTERM once the state is saved).

    Args:
        directory: where checkpoints live; default ``$SPOT_CHECKPOINT_DIR``.
        run_id: written into each manifest; default ``$SPOT_RUN_ID``, else ``"local"``.
        keep: how many complete checkpoints to keep locally (None keeps all).
        save_every: save with reason ``periodic`` at every step divisible by this.
        handle_signals: install the SIGTERM / SIGUSR1 handlers (main thread only).
        on_save: called with the manifest after each checkpoint written, on the
            training thread (for a background save: at the first ``step_done``,
            :meth:`wait` or :meth:`close` after it finished); on rank 0 only.
        async_save: write periodic and requested saves in a background thread; the
            loop then waits only for the copy of the state into CPU memory.
        shard_bytes: a state value whose tensors hold more than this is written as
            several files of at most about this size (``<key>-00000.pt`` ...).
        notice_file: the supervisor's notice (default ``$SPOT_NOTICE_FILE``): when
            stopping, a save that cannot finish before its deadline is skipped.
        deadline_margin: seconds kept free before the notice deadline, on top of
            ``1.25 x`` the duration of the last save.
        save_dir: for a library that saves its own state into a directory (Accelerate's
            ``accelerator.save_state``): each save calls it with an empty staging
            directory, then commits what it wrote (:meth:`save_directory`) with the
            progress of :meth:`step_done` as ``progress.pt``. :meth:`restore` then
            takes no objects and returns the checkpoint's path for the library to load.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        *,
        keep: int | None = 3,
        save_every: int | None = None,
        handle_signals: bool = True,
        on_save: Callable[[Manifest], None] | None = None,
        async_save: bool = True,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        notice_file: str | os.PathLike[str] | None = None,
        deadline_margin: float = 5.0,
        save_dir: Callable[[Path], object] | None = None,
    ) -> None:
        if save_every is not None and save_every < 1:
            raise ValueError(f"save_every must be at least 1 (or None), got {save_every}")
        if deadline_margin < 0:
            raise ValueError(f"deadline_margin must not be negative, got {deadline_margin}")
        super().__init__(
            directory,
            run_id,
            keep=keep,
            on_save=on_save,
            shard_bytes=shard_bytes,
            save_dir=save_dir,
        )
        self.save_every = save_every
        self.async_save = async_save
        self.notice_file = notice_file
        self.deadline_margin = deadline_margin
        self.skipped_step: int | None = None
        self.signals = SignalFlags()
        if handle_signals:
            self.signals.install()

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Wait for the save in flight, then put back the previous signal handlers.

        Raises :class:`CheckpointError` when that save failed.
        """
        try:
            super().close()
        finally:
            self.signals.uninstall()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as save_error:  # the exception already raised wins
            log.error("%s", save_error)

    # -- signals and the step boundary ---------------------------------------------

    @property
    def stop_requested(self) -> bool:
        """SIGTERM (or :meth:`request_stop`) arrived: save at the next boundary, then stop."""
        return self.signals.stop_requested

    def request_stop(self) -> None:
        """Behave as if SIGTERM arrived (for callers that learn of a notice another way)."""
        self.signals.stop_requested = True

    def request_save(self) -> None:
        """Behave as if SIGUSR1 arrived: save at the next step boundary."""
        self.signals.save_requested = True

    def step_done(self, step: int, *, final: bool = False, **progress: Any) -> bool:
        """Call at each step boundary (state after ``step`` steps); True means stop the loop.

        Saves with reason ``final`` when ``final``, ``periodic`` every ``save_every``
        steps, ``requested`` after SIGUSR1 and ``interrupt`` after SIGTERM; writes
        nothing when this step's state is already in a checkpoint or in the one being
        written. ``progress`` holds plain values (epoch, index within the epoch, ...)
        returned by :meth:`restore`. Also safe to call at the boundary training resumed
        from, before the first step.

        A periodic or requested save is written in the background (``async_save``);
        the save made when stopping is written at once, unless the notice deadline
        leaves too little time for it (then it is skipped, and said so in the log).
        Before returning True every save is finished. Raises :class:`CheckpointError`
        when a background save failed. Under ``torch.distributed`` every rank must
        call it at every boundary: one all_reduce agrees on stop and save.
        """
        if self._saves.done:
            self.wait()  # report a background save that has finished
        boundary = self.decide(step, final=final)
        stop, reason = boundary.stop, boundary.reason
        if stop or final:
            # The last save is written now, from the live state: the snapshot buffers'
            # warm-up is of no use any more, and must not hold it up.
            self._saves.stop_warmup()
        elif self.async_save and self.save_dir is None and not self._saves.warmed:
            self._saves.warm(self.snapshot(step, **progress))
        if boundary.save and reason is not None:
            if self.save_dir is not None:
                state.check_plain(progress, "progress")
                self.save_directory(step, reason, fill=self.save_dir, progress=progress)
            elif stop or final or not self.async_save:
                self.save(step, self.snapshot(step, **progress), reason)
            else:
                self.save_async(step, self.snapshot(step, **progress), reason)
        if stop or final:
            self.wait()
        if stop and not final:
            saved_now = self.skipped_step != step
            log.info(
                "stopping at step %d: SIGTERM received%s",
                step,
                " and the state is saved" if saved_now else "; its save was skipped",
            )
        return final or stop

    def decide(self, step: int, *, final: bool = False, periodic: bool | None = None) -> Boundary:
        """Whether to save (and why) and whether to stop at boundary ``step``, all ranks agreed.

        The decision part of :meth:`step_done`, for a loop the manager does not drive (a
        framework's trainer, whose callbacks then save and stop): consumes SIGUSR1,
        looks at SIGTERM and the notice deadline, and under ``torch.distributed`` makes
        every rank agree with one all_reduce (every rank must call it at every
        boundary). ``periodic`` says whether a periodic save is due (the framework's own
        schedule); None uses ``save_every``. The reason is None when the step is already
        in a checkpoint. A stop whose save the deadline does not leave time for is
        logged and recorded (:attr:`skipped_step`) here.
        """
        boundary = schedule.decide(
            step,
            final=final,
            periodic=periodic,
            save_every=self.save_every,
            signals=self.signals,
            ranks=self._dist(),
            newest_step=self._last_step,
            last_save_seconds=self._last_save_seconds,
            notice_file=self.notice_file,
            deadline_margin=self.deadline_margin,
        )
        if boundary.skip:
            self.skipped_step = step
        return boundary
