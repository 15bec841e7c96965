"""The supervisor's decisions, as a table: each case is one row of daemon/policy.py's."""

from __future__ import annotations

import pytest

from daemon.policy import (
    MAX_BACKOFF_S,
    Step,
    backoff_s,
    exit_code_after_drain,
    on_backoff_over,
    on_crash,
    on_hang,
    on_lease_lost,
    on_notice,
    on_standby_poll,
    on_stop_signal,
    on_trainer_exit,
)


@pytest.mark.parametrize(
    ("kind", "action", "standby", "step"),
    [
        ("interruption", "terminate", False, Step.DRAIN),
        ("interruption", "stop", False, Step.DRAIN),
        ("interruption", "some-new-action", False, Step.DRAIN),  # new actions still act
        ("interruption", "hibernate", False, Step.CHECKPOINT),
        ("rebalance", "rebalance", False, Step.CHECKPOINT),
        ("maintenance", "instance-retirement", False, Step.SCHEDULE),
        ("maintenance", "system-reboot", False, Step.SCHEDULE),
        ("unknown-kind", "x", False, Step.IGNORE),
        ("interruption", "terminate", True, Step.EXIT_DONE),
        ("interruption", "hibernate", True, Step.EXIT_DONE),
        ("rebalance", "rebalance", True, Step.IGNORE),  # no trainer to ask
        ("maintenance", "instance-stop", True, Step.IGNORE),
    ],
)
def test_notices(kind: str, action: str, standby: bool, step: Step) -> None:
    assert on_notice(kind, action, standby=standby) is step


@pytest.mark.parametrize(("standby", "step"), [(False, Step.DRAIN), (True, Step.EXIT_DONE)])
def test_our_own_stop(standby: bool, step: Step) -> None:
    assert on_stop_signal(standby=standby) is step


@pytest.mark.parametrize(
    ("success", "reason", "progressed", "step"),
    [
        (False, None, False, Step.CRASH),
        (False, "periodic", True, Step.CRASH),  # a crash is a crash, whatever it saved
        (True, "final", True, Step.COMPLETE),
        (True, "final", False, Step.COMPLETE),  # resumed at the end, nothing left to do
        (True, "interrupt", True, Step.RESTART_NOW),  # an operator's kill, a peer's stop
        (True, "periodic", True, Step.RESTART_NOW),
        (True, "requested", True, Step.RESTART_NOW),
        (True, "interrupt", False, Step.CRASH),  # exits 0 without training: counted
        (True, None, False, Step.CONFIG_ERROR),  # never wrote a checkpoint
    ],
)
def test_trainer_exits(success: bool, reason: str | None, progressed: bool, step: Step) -> None:
    assert on_trainer_exit(success=success, newest_reason=reason, progressed=progressed) is step


@pytest.mark.parametrize(
    ("failures", "max_restarts", "step"),
    [
        (1, 5, Step.BACKOFF),
        (5, 5, Step.BACKOFF),  # max_restarts restarts are allowed in the window
        (6, 5, Step.GIVE_UP),
        (1, 0, Step.GIVE_UP),  # max_restarts 0: the first crash ends the run
    ],
)
def test_crashes(failures: int, max_restarts: int, step: Step) -> None:
    assert on_crash(failures=failures, max_restarts=max_restarts) is step


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, MAX_BACKOFF_S), (40, MAX_BACKOFF_S)],
)
def test_backoff_doubles_up_to_its_cap(failures: int, seconds: float) -> None:
    assert backoff_s(failures) == seconds


@pytest.mark.parametrize(("rejoin_failed", "step"), [(False, Step.START), (True, Step.CRASH)])
def test_backoff_over(rejoin_failed: bool, step: Step) -> None:
    assert on_backoff_over(rejoin_failed=rejoin_failed) is step


@pytest.mark.parametrize(
    ("complete", "took", "step"),
    [
        (True, False, Step.EXIT_DONE),
        (True, True, Step.EXIT_DONE),  # finished elsewhere wins over a slot
        (False, True, Step.TAKE_SLOT),
        (False, False, Step.WAIT),
    ],
)
def test_standby_polls(complete: bool, took: bool, step: Step) -> None:
    assert on_standby_poll(complete=complete, took_slot=took) is step


def test_hang_and_lease_loss() -> None:
    assert on_hang() is Step.CRASH
    assert on_lease_lost() is Step.KEEP_TRAINING


@pytest.mark.parametrize(
    ("source", "configured", "code"),
    [("signal", 75, 0), ("aws-imds", 75, 75), ("aws-imds", 0, 0), ("gcp-metadata", 75, 75)],
)
def test_exit_code_after_a_drain(source: str, configured: int, code: int) -> None:
    assert exit_code_after_drain(source, configured) == code
