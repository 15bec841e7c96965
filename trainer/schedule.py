"""The decision at one step boundary: save or not (and why), stop or not (CONTRACT §3, §4).

:func:`decide` is what :meth:`trainer.CheckpointManager.decide` (and so ``step_done``)
runs at every boundary: it consumes SIGUSR1, looks at SIGTERM and at the notice
deadline, and under ``torch.distributed`` makes every rank agree with one all_reduce.
It writes nothing: saving is the caller's part.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass

from trainer.distributed import Ranks
from trainer.signals import SignalFlags, notice_deadline
from trainer.state import LOGGER

log = logging.getLogger(LOGGER)

# How much longer than the last save an interrupt save is assumed to take (a loaded
# disk, a larger state), on top of ``deadline_margin``.
SAVE_TIME_FACTOR = 1.25


@dataclass(frozen=True)
class Boundary:
    """What one step boundary calls for, as every rank agreed (:meth:`CheckpointManager.decide`)."""

    step: int
    reason: str | None
    """The reason to save with; None when no save is due or this step is already saved."""
    stop: bool
    """SIGTERM arrived (on any rank): stop after this boundary."""
    skip: bool
    """The stop's save is skipped: the notice deadline leaves too little time for it."""

    @property
    def save(self) -> bool:
        """Whether to write a checkpoint of this step now."""
        return self.reason is not None and not self.skip


def decide(
    step: int,
    *,
    final: bool,
    periodic: bool | None,
    save_every: int | None,
    signals: SignalFlags,
    ranks: Ranks | None,
    newest_step: int | None,
    last_save_seconds: float | None,
    notice_file: str | os.PathLike[str] | None,
    deadline_margin: float,
) -> Boundary:
    """The boundary after ``step``, all ranks agreed; a skipped stop's save is logged here.

    ``newest_step`` is the step of the newest checkpoint written, being written or
    restored: a boundary at that step saves nothing. ``periodic`` None means every
    ``save_every`` steps.
    """
    stop = signals.stop_requested
    save_request = signals.take_save_request()
    saved = step == newest_step  # in a complete checkpoint, or the one being written
    reason = reason_for(step, final, stop, save_request, periodic, save_every)
    doomed = bool(
        stop
        and reason is not None
        and not saved
        and deadline_too_close(step, notice_file, last_save_seconds, deadline_margin, newest_step)
    )
    if ranks is not None:
        agreed = ranks.agree_max([int(stop), int(save_request), int(doomed)])
        if agreed[0] and not stop:
            log.info("stop agreed at step %d: another rank received SIGTERM", step)
            signals.stop_requested = True
        stop, save_request, doomed = (bool(v) for v in agreed)
        reason = reason_for(step, final, stop, save_request, periodic, save_every)
    if saved:
        reason = None
    skip = bool(stop and doomed and reason is not None)
    if skip:
        log.warning(
            "save_skipped: the %s save at step %d is skipped (deadline); exiting with the "
            "newest checkpoint at step %s",
            reason,
            step,
            newest_step,
        )
    return Boundary(step, reason, stop, skip)


def reason_for(
    step: int,
    final: bool,
    stop: bool,
    save_request: bool,
    periodic: bool | None,
    save_every: int | None,
) -> str | None:
    """The reason a save at ``step`` would carry, or None when none is due."""
    if final:
        return "final"
    if stop:
        # CONTRACT §3: a save made because of SIGTERM is an interrupt save, even at a
        # periodic boundary; and SIGTERM wins over SIGUSR1, as the save is the last one.
        return "interrupt"
    if periodic is None:
        periodic = bool(save_every and step > 0 and step % save_every == 0)
    if periodic:
        return "periodic"
    # A request at a step already saved is answered by that save.
    return "requested" if save_request else None


def deadline_too_close(
    step: int,
    notice_file: str | os.PathLike[str] | None,
    last_save_seconds: float | None,
    deadline_margin: float,
    newest_step: int | None,
) -> bool:
    """Whether the notice deadline leaves less time than a save needs (logged when so)."""
    deadline = notice_deadline(notice_file)
    if deadline is None:
        return False
    left = (deadline - dt.datetime.now(dt.timezone.utc)).total_seconds()
    took = last_save_seconds or 0.0
    needed = took * SAVE_TIME_FACTOR + deadline_margin
    if left >= needed:
        return False
    log.warning(
        "save_skipped: not saving step %d: the notice deadline is %.1f s away and the "
        "last save took %.1f s (%.1f s needed with the margin); a save cut off by the "
        "kill would leave only a partial directory. Newest checkpoint: step %s",
        step,
        left,
        took,
        needed,
        newest_step,
    )
    return True
