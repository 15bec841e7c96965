"""A process's stdout followed line by line, for the harnesses that run trainers (no tests).

The one reader behind ``Trainer`` (test_trainer_harness.py: ``trainer.example``, alone or
under torchrun), ``Script`` (integration_runs.py: the framework reference scripts) and
``Pair`` (test_trainer_multinode.py: two torchrun agents, rank 0's lines), and the
patterns of the reference scripts' stdout lines (CONTRACT §6) they wait for. What must
not live here: anything about what is run (its command line, environment, checkpoints).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FINAL_RE = re.compile(r"^final_params_sha256=([0-9a-f]{64})$")
STEP_RE = re.compile(r"^step=(\d+) loss=")
SAVED_RE = re.compile(r"^checkpoint_saved step=(\d+) reason=(\w+) bytes=\d+$")
STOPPED_RE = re.compile(r"^stopped step=(\d+)$")
START_RE = re.compile(r"^(?:start step=0|resumed step=(\d+) reason=\w+)$")


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a process started here: this one's, one thread (the runs are
    tiny, and the tests share two cores), unbuffered, no notice file unless ``extra``
    (applied last) names one."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SPOT_NOTICE_FILE", None)
    env.update(extra)
    return env


class Followed:
    """The stdout lines of the processes handed to :meth:`follow`, in one queue.

    ``timeout`` is the default wait of :meth:`wait_for` (and of ``finish``, where there is
    one); ``what`` names the process in the failure when its stdout ends first.
    """

    timeout: float = 60
    what = "trainer"

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()

    def follow(self, proc: subprocess.Popen[str]) -> None:
        """Read ``proc``'s stdout into the queue, on a thread of its own."""
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float | None = None) -> re.Match[str]:
        """The first line (from now on) matching ``pattern``; fails on EOF or timeout."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern.pattern} in {timeout}s\n{self.report()}")
            if line is None:
                self.ended(pattern)
                continue
            self.lines.append(line)
            m = pattern.match(line)
            if m:
                return m

    def ended(self, pattern: re.Pattern[str]) -> None:
        """A followed stdout ended before a line matching ``pattern``: a failure."""
        pytest.fail(f"{self.what} exited before {pattern.pattern}\n{self.report()}")

    def drain(self) -> None:
        """Take in the lines left, up to the end of stdout (after the process exited)."""
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)

    def saved(self) -> list[tuple[int, str]]:
        """``(step, reason)`` of every ``checkpoint_saved`` line so far."""
        return [(int(m[1]), m[2]) for line in self.lines if (m := SAVED_RE.match(line))]

    def report(self) -> str:
        """stdout so far, for a failure message."""
        return "stdout:\n" + "\n".join(self.lines[-40:])


class FollowedProcess(Followed):
    """One process run from the checkout, stdout followed, stderr into ``stderr_path``."""

    def __init__(self, argv: list[str], env: Mapping[str, str], stderr_path: Path) -> None:
        super().__init__()
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True
            )
        self.follow(self.proc)

    def finish(self, timeout: float | None = None) -> int:
        """Wait for exit and drain stdout; the exit status."""
        rc = self.proc.wait(timeout=self.timeout if timeout is None else timeout)
        self.drain()
        return rc

    def stderr(self) -> str:
        """All of stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def stderr_tail(self) -> str:
        """The end of stderr."""
        return self.stderr()[-4000:]

    def report(self) -> str:
        """stdout and stderr so far, for a failure message."""
        return super().report() + "\nstderr:\n" + self.stderr_tail()

    def kill(self) -> None:
        """SIGKILL, for cleanup."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
