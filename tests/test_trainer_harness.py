"""Runs the reference trainer as a real subprocess and follows its stdout (no tests here).

Shared by test_trainer_resume.py and test_trainer_signals.py, which import it as a
sibling module (pytest puts this directory on sys.path); named test_trainer_* only
because that is where the trainer's tests live.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from daemon.layout import list_step_dirs, load_complete, parse_tmp_dir

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
FINAL_RE = re.compile(r"^final_params_sha256=([0-9a-f]{64})$")
STEP_RE = re.compile(r"^step=(\d+) loss=")
SAVED_RE = re.compile(r"^checkpoint_saved step=(\d+) reason=(\w+) bytes=\d+$")
STOPPED_RE = re.compile(r"^stopped step=(\d+)$")
START_RE = re.compile(r"^(?:start step=0|resumed step=(\d+) reason=\w+)$")


class Trainer:
    """``python -m trainer.example`` with its stdout followed line by line.

    With ``ranks`` > 1 it runs under ``torchrun --standalone`` (gloo on CPU); stdout is
    then rank 0's. ``env`` adds to the environment (e.g. ``SPOT_NOTICE_FILE``).
    """

    def __init__(
        self, ckpt_dir: Path, *args: str, env: dict[str, str] | None = None, ranks: int = 1
    ) -> None:
        full_env = dict(os.environ)
        full_env.update(
            SPOT_CHECKPOINT_DIR=str(ckpt_dir),
            SPOT_RUN_ID="test-run",
            # One thread: the runs are tiny, and the tests share two cores.
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        full_env.pop("SPOT_NOTICE_FILE", None)
        full_env.update(env or {})
        launcher = [sys.executable, "-m"]
        if ranks > 1:
            launcher = [TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", "-m"]
        self.stderr_path = ckpt_dir.parent / f"stderr-{time.monotonic_ns()}.log"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*launcher, "trainer.example", "--device", "cpu", *args],
                cwd=REPO,
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 60) -> re.Match[str]:
        """The first line (from now on) matching ``pattern``; fails on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern.pattern} in {timeout}s\n{self.report()}")
            if line is None:
                pytest.fail(f"trainer exited before {pattern.pattern}\n{self.report()}")
            self.lines.append(line)
            m = pattern.match(line)
            if m:
                return m

    def finish(self, timeout: float = 60) -> int:
        """Wait for exit and drain stdout; the exit status."""
        rc = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc

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

    def saved(self) -> list[tuple[int, str]]:
        """``(step, reason)`` of every ``checkpoint_saved`` line so far."""
        return [(int(m[1]), m[2]) for line in self.lines if (m := SAVED_RE.match(line))]

    def report(self) -> str:
        """stdout and stderr so far, for a failure message."""
        return "stdout:\n" + "\n".join(self.lines[-40:]) + "\nstderr:\n" + self.stderr_tail()

    def stderr_tail(self) -> str:
        """The end of stderr."""
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL, for cleanup."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


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
