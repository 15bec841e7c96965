"""Runs the reference trainer as a real subprocess and follows its stdout (no tests here).

Shared by test_trainer_resume.py and test_trainer_signals.py, which import it as a
sibling module (pytest puts this directory on sys.path); named test_trainer_* only
because that is where the trainer's tests live.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest
from followed import (
    FINAL_RE,
    REPO,
    SAVED_RE,
    START_RE,
    STEP_RE,
    STOPPED_RE,
    FollowedProcess,
    child_env,
)

from daemon.layout import list_step_dirs, load_complete, parse_tmp_dir

# The line patterns, importable from here as before they moved to followed.py.
__all__ = [
    "FINAL_RE",
    "REPO",
    "SAVED_RE",
    "START_RE",
    "STEP_RE",
    "STOPPED_RE",
    "TORCHRUN",
    "Trainer",
    "reasons",
    "run_to_end",
    "tmp_dirs",
]

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


class Trainer(FollowedProcess):
    """``python -m trainer.example`` with its stdout followed line by line.

    With ``ranks`` > 1 it runs under ``torchrun --standalone`` (gloo on CPU); stdout is
    then rank 0's. ``env`` adds to the environment (e.g. ``SPOT_NOTICE_FILE``).
    """

    def __init__(
        self, ckpt_dir: Path, *args: str, env: dict[str, str] | None = None, ranks: int = 1
    ) -> None:
        full_env = child_env(
            {"SPOT_CHECKPOINT_DIR": str(ckpt_dir), "SPOT_RUN_ID": "test-run", **(env or {})}
        )
        launcher = [sys.executable, "-m"]
        if ranks > 1:
            launcher = [TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", "-m"]
        super().__init__(
            [*launcher, "trainer.example", "--device", "cpu", *args],
            full_env,
            ckpt_dir.parent / f"stderr-{time.monotonic_ns()}.log",
        )

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the trainer's main process."""
        self.proc.send_signal(signum)

    def rank_pid(self, rank: int) -> int:
        """The pid of one rank's worker process under torchrun (found by its RANK)."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "trainer.example" in " ".join(
                    child.cmdline()
                ):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        pytest.fail(f"no worker process of rank {rank}\n{self.report()}")


def run_to_end(ckpt_dir: Path, *args: str) -> tuple[str, Trainer]:
    """Run (or resume) the trainer to its last step; its final_params_sha256."""
    t = Trainer(ckpt_dir, *args)
    try:
        m = t.wait_for(FINAL_RE, timeout=120)
        assert t.finish() == 0, t.report()
    finally:
        t.kill()
    return m[1], t


def reasons(ckpt_dir: Path) -> dict[int, str]:
    """Step -> reason of every complete checkpoint."""
    return {step: load_complete(path).reason for step, path in list_step_dirs(ckpt_dir)}


def tmp_dirs(ckpt_dir: Path) -> list[str]:
    """Names of writer temporary directories."""
    return [n for n in os.listdir(ckpt_dir) if parse_tmp_dir(n) is not None]
