"""What each event means: every "what now?" of the supervisor, as pure functions.

No I/O, no clock, no state: the supervisor observes (a notice, a signal, the trainer's
exit and its newest checkpoint, the standby's look at the bucket), asks here, and acts.
``tests/test_policy.py`` holds the whole table. In words:

==========================================  =================================================
event                                       step
==========================================  =================================================
spot interruption (terminate, stop, new)    DRAIN: notice file, SIGTERM, drain clock, commit
spot interruption ``hibernate``             CHECKPOINT: SIGUSR1 (hibernation keeps memory)
rebalance recommendation                    CHECKPOINT: SIGUSR1, keep training
scheduled maintenance                       SCHEDULE: SIGUSR1 when due, the event itself
                                            arrives as ``systemctl stop``
anything else                               IGNORE (logged)
our own stop (SIGTERM/SIGINT), training     DRAIN, with ``daemon.stop_budget``
our own stop, or a notice, in standby       EXIT_DONE
trainer exit != 0, or killed                CRASH: kill its leftovers, back off, restart
trainer exit 0, newest checkpoint final     COMPLETE: commit, complete.json, exit 0
trainer exit 0, other reason, progressed    RESTART_NOW: stopped elsewhere (an operator's
                                            kill, a peer rank's stop); commit and resume
trainer exit 0, other reason, no progress   CRASH: a command that never writes ``final``
                                            ends in ``max_restarts``, not in a loop
trainer exit 0, no checkpoint at all        CONFIG_ERROR: exit 2, the contract is not met
trainer alive, no checkpoint in time        CRASH (after killing its tree)
a crash, at most ``max_restarts`` in the    BACKOFF: 1, 2, 4 ... s (at most
``restart_window``                          :data:`MAX_BACKOFF_S`), then start again
a crash, more than that                     GIVE_UP: commit what is complete, exit 1
backoff over (several nodes: rejoined)      START the training command again
backoff over, the rejoin failed             CRASH: not aligned with the global commit
                                            (storage down), not safe to start
standby: run complete elsewhere             EXIT_DONE (exit 0)
standby: a slot taken                       TAKE_SLOT: restore what is new, train
standby: neither                            WAIT
lease lost while training                   KEEP_TRAINING: the lease decides who *starts*
==========================================  =================================================

After a drain the exit code is 0 for our own stop, ``daemon.exit_code_after_notice``
after a cloud's notice (:func:`exit_code_after_drain`).
"""

from __future__ import annotations

import enum

FINAL_REASON = "final"
SIGNAL_SOURCE = "signal"
MAX_BACKOFF_S = 60.0
"""The longest wait before a crashed trainer is started again."""


class Step(str, enum.Enum):
    """What the supervisor does next."""

    DRAIN = "drain"
    CHECKPOINT = "checkpoint"
    SCHEDULE = "schedule"
    IGNORE = "ignore"
    COMPLETE = "complete"
    RESTART_NOW = "restart_now"
    CRASH = "crash"
    CONFIG_ERROR = "config_error"
    EXIT_DONE = "exit_done"
    TAKE_SLOT = "take_slot"
    WAIT = "wait"
    KEEP_TRAINING = "keep_training"
    BACKOFF = "backoff"
    GIVE_UP = "give_up"
    START = "start"


def on_notice(kind: str, action: str, *, standby: bool = False) -> Step:
    """A notice from the cloud (:class:`daemon.notices.Notice` ``kind`` and ``action``)."""
    if kind == "interruption":
        if standby:
            return Step.EXIT_DONE
        # Hibernation starts at once and keeps the trainer's memory: killing it would
        # lose what hibernation saves. Checkpoint, in case the instance never resumes.
        return Step.CHECKPOINT if action == "hibernate" else Step.DRAIN
    if standby:
        return Step.IGNORE  # no trainer to ask for a checkpoint
    if kind == "rebalance":
        return Step.CHECKPOINT  # not yet a notice, a raised risk
    if kind == "maintenance":
        return Step.SCHEDULE
    return Step.IGNORE


def on_stop_signal(*, standby: bool = False) -> Step:
    """SIGTERM or SIGINT to the supervisor (``systemctl stop``, the OS shutting down)."""
    return Step.EXIT_DONE if standby else Step.DRAIN


def on_trainer_exit(*, success: bool, newest_reason: str | None, progressed: bool) -> Step:
    """The trainer ended without our SIGTERM. ``newest_reason``: the reason of the newest
    complete local checkpoint (None: there is none); ``progressed``: whether it wrote a
    newer checkpoint than the one it started from."""
    if not success:
        return Step.CRASH
    if newest_reason is None:
        return Step.CONFIG_ERROR
    if newest_reason == FINAL_REASON:
        return Step.COMPLETE
    return Step.RESTART_NOW if progressed else Step.CRASH


def on_hang() -> Step:
    """A trainer alive but without a new checkpoint within ``daemon.progress_timeout``."""
    return Step.CRASH


def on_crash(*, failures: int, max_restarts: int) -> Step:
    """The trainer crashed (or hung); ``failures``: crashes within ``daemon.restart_window``,
    this one included."""
    return Step.GIVE_UP if failures > max_restarts else Step.BACKOFF


def backoff_s(failures: int) -> float:
    """Seconds to wait before the next start after ``failures`` crashes in the window:
    doubling from 1 s, at most :data:`MAX_BACKOFF_S`."""
    return min(MAX_BACKOFF_S, 2.0 ** (failures - 1))


def on_backoff_over(*, rejoin_failed: bool) -> Step:
    """The backoff is over, and (several nodes) the rejoin with the global commit ended."""
    return Step.CRASH if rejoin_failed else Step.START


def on_standby_poll(*, complete: bool, took_slot: bool) -> Step:
    """A standby's look at the bucket."""
    if complete:
        return Step.EXIT_DONE
    return Step.TAKE_SLOT if took_slot else Step.WAIT


def on_lease_lost() -> Step:
    """Another instance replaced our slot's lease while we train."""
    return Step.KEEP_TRAINING


def exit_code_after_drain(source: str, exit_code_after_notice: int) -> int:
    """0 after our own stop; ``daemon.exit_code_after_notice`` after a cloud's notice."""
    return 0 if source == SIGNAL_SOURCE else exit_code_after_notice
