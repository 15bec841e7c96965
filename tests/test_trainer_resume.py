"""Exact resume: the reference trainer interrupted at random step boundaries, and once
SIGKILLed in the middle of writing a checkpoint, ends with the same parameters as a run
never interrupted (CONTRACT §6). Real subprocesses and real signals, timed from the
trainer's stdout progress lines.
"""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import pytest
from test_trainer_harness import (
    FINAL_RE,
    START_RE,
    STOPPED_RE,
    Trainer,
    reasons,
    run_to_end,
    tmp_dirs,
)

from daemon.layout import list_step_dirs, parse_tmp_dir

pytestmark = pytest.mark.slow

BASE = ["--steps", "40", "--save-every", "5", "--seed", "3", "--keep", "3"]


def _interrupt_repeatedly(ckpt_dir: Path) -> list[int]:
    """Five SIGTERMs at random boundaries and one SIGKILL mid-save; the steps resumed from."""
    rng = random.Random(20261128)
    step_args = [*BASE, "--step-seconds", "0.03"]
    plan = ["term", "term", "term", "kill", "term", "term"]
    resumed_from: list[int] = []
    killed_step: int | None = None
    for action in plan:
        big = ["--state-mb", "64"] if action == "kill" else ["--state-mb", "2"]
        t = Trainer(ckpt_dir, *step_args, *big)
        try:
            start = t.wait_for(START_RE)
            at = int(start[1] or 0)
            resumed_from.append(at)
            if killed_step is not None:
                # The killed save left only a .tmp- directory: swept at start, and the
                # run resumed from an older complete checkpoint.
                assert tmp_dirs(ckpt_dir) == []
                assert at < killed_step
                killed_step = None
            if action == "term":
                target = at + rng.randint(1, 5)
                t.wait_for(re.compile(rf"^step={target} loss="))
                t.signal(signal.SIGTERM)
                stopped = t.wait_for(STOPPED_RE)
                assert t.finish() == 0, t.report()
                stop = int(stopped[1])
                assert stop >= target
                # The newest checkpoint holds exactly the state it stopped in.
                newest = reasons(ckpt_dir)
                assert max(newest) == stop
                assert newest[stop] == "interrupt"
            else:
                # Kill as soon as a writer's directory appears: mid-save, by construction
                # (a 64 MiB ballast takes far longer to write than this loop to notice).
                deadline = time.monotonic() + 60
                while not (seen := tmp_dirs(ckpt_dir)):
                    assert time.monotonic() < deadline, t.report()
                    assert t.proc.poll() is None, t.report()
                    time.sleep(0.0005)
                t.signal(signal.SIGKILL)
                assert t.finish() == -signal.SIGKILL
                left = tmp_dirs(ckpt_dir)
                assert left == seen, "the save finished before SIGKILL landed"
                killed_step = parse_tmp_dir(left[0])
                assert killed_step is not None
                assert killed_step not in reasons(ckpt_dir), "a killed save must not complete"
        finally:
            t.kill()
    return resumed_from


def test_interrupted_and_killed_runs_resume_to_the_same_parameters(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "interrupted"
    # The uninterrupted run goes alongside the interrupted ones (two cores, one thread each).
    first = Trainer(tmp_path / "reference", *BASE)
    try:
        resumed_from = _interrupt_repeatedly(ckpt_dir)
        reference = first.wait_for(FINAL_RE, timeout=120)[1]
        assert first.finish() == 0, first.report()
    finally:
        first.kill()
    assert first.saved()[-1] == (40, "final")
    assert reasons(tmp_path / "reference")[40] == "final"

    final, _ = run_to_end(ckpt_dir, *BASE, "--step-seconds", "0.01")
    assert final == reference, f"resumed from {resumed_from}: hashes differ"
    assert tmp_dirs(ckpt_dir) == []
    assert reasons(ckpt_dir)[40] == "final"
    assert len(list_step_dirs(ckpt_dir)) == 3  # --keep 3
