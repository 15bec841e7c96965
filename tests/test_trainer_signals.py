"""The reference trainer's signal handling, as a real subprocess with real signals.

SIGUSR1 saves with reason ``requested`` and training goes on; SIGTERM at a boundary
whose state is already saved writes nothing new and exits 0 (CONTRACT §3).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer_harness import (
    FINAL_RE,
    REPO,
    SAVED_RE,
    STEP_RE,
    STOPPED_RE,
    Trainer,
    reasons,
    run_to_end,
    tmp_dirs,
)

pytestmark = pytest.mark.slow


def test_sigusr1_saves_requested_and_training_continues(tmp_path: Path) -> None:
    t = Trainer(tmp_path / "c", "--steps", "25", "--save-every", "100", "--step-seconds", "0.05")
    try:
        t.wait_for(re.compile(r"^step=5 loss="))
        t.signal(signal.SIGUSR1)
        saved = t.wait_for(SAVED_RE)
        assert saved[2] == "requested" and int(saved[1]) >= 5
        final = t.wait_for(FINAL_RE)[1]
        assert t.finish() == 0, t.report()
    finally:
        t.kill()
    assert t.saved() == [(int(saved[1]), "requested"), (25, "final")]
    steps = [int(m[1]) for line in t.lines if (m := STEP_RE.match(line))]
    assert steps == list(range(1, 26))  # no step skipped or repeated around the save

    # Started again on a finished run: trains nothing, saves nothing, same line.
    again, t2 = run_to_end(tmp_path / "c", "--steps", "25", "--save-every", "100")
    assert again == final
    assert t2.lines[0] == "resumed step=25 reason=final"
    assert not any(STEP_RE.match(line) for line in t2.lines)
    assert t2.saved() == []


def test_sigterm_at_a_periodic_boundary_saves_with_reason_interrupt(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "c"
    # Every boundary is a periodic one, so wherever SIGTERM lands the stop's save falls on
    # one: CONTRACT §3 names it `interrupt` all the same. (A SIGTERM at a boundary already
    # saved writes nothing new: test_trainer_async, in-process.)
    t = Trainer(ckpt_dir, "--steps", "50", "--save-every", "1", "--step-seconds", "0.05")
    try:
        t.wait_for(re.compile(r"^step=4 loss="))
        t.signal(signal.SIGTERM)
        stopped = t.wait_for(STOPPED_RE)
        assert t.finish() == 0, t.report()
    finally:
        t.kill()
    stop = int(stopped[1])
    assert t.saved()[-1] == (stop, "interrupt"), t.saved()
    assert all(reason == "periodic" for _, reason in t.saved()[:-1]), t.saved()
    found = reasons(ckpt_dir)
    assert max(found) == stop and found[stop] == "interrupt"
    assert tmp_dirs(ckpt_dir) == []


def test_sigterm_too_close_to_the_deadline_skips_the_save_and_exits_0(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "c"
    notice = tmp_path / "notice.json"
    t = Trainer(
        ckpt_dir,
        *("--steps", "200", "--save-every", "5", "--step-seconds", "0.05"),
        env={"SPOT_NOTICE_FILE": str(notice)},
    )
    try:
        t.wait_for(SAVED_RE)  # one save done: its duration is known
        # What the supervisor writes before SIGTERM, with a deadline already past.
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        doc = {"action": "terminate", "deadline": past.isoformat(), "source": "aws-imds"}
        notice.with_suffix(".tmp").write_text(json.dumps(doc))
        notice.with_suffix(".tmp").rename(notice)
        t.signal(signal.SIGTERM)
        skipped = t.wait_for(re.compile(r"^save_skipped step=(\d+) reason=deadline$"))
        stopped = t.wait_for(STOPPED_RE)
        assert t.finish() == 0, t.report()
    finally:
        t.kill()
    stop = int(stopped[1])
    assert int(skipped[1]) == stop
    assert "save_skipped" in t.stderr_tail() and "deadline" in t.stderr_tail()
    # Nothing of the skipped save: no checkpoint of that step, no partial directory.
    assert max(reasons(ckpt_dir)) < stop
    assert set(reasons(ckpt_dir).values()) == {"periodic"}
    assert tmp_dirs(ckpt_dir) == []


def test_missing_checkpoint_directory_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SPOT_CHECKPOINT_DIR"}
    r = subprocess.run(
        [sys.executable, "-m", "trainer.example", "--steps", "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "SPOT_CHECKPOINT_DIR" in r.stderr
