"""The chaos run's processes: supervisors on simulated instances and their trainers (no tests).

:class:`Harness` boots a real ``spot-supervisor run`` on an instance (a new one: an
empty local dir; or the same one again), finds its trainer, tells whether it is
training, and restarts a supervisor that exited on its own as systemd would. What must
not live here: the events (chaos_events.py), the checks (chaos_checker.py), the order of
the run (chaos_run.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chaos_checker import InvariantViolation
from chaos_schedule import BUCKET, PREFIX, RUN_ID, Settings

from daemon.standins import FAKE_AWS_ENV
from daemon.standins.demo import SupervisorProcess, trainer_command, write_config
from daemon.standins.faultproxy import Rule

REPO = Path(__file__).resolve().parent.parent
STEP_LINE_RE = re.compile(r"^step=(\d+) loss=")
RESUMED_RE = re.compile(r"^resumed step=(\d+)")


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def wait_until(pred: Callable[[], bool], timeout: float, every: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return pred()


def lines_of(sup: SupervisorProcess) -> list[str]:
    return list(sup.lines)


class Harness:
    """The processes of one chaos run: the supervisor booted on each (simulated) instance,
    its trainer, and what a test can ask of them; :class:`chaos_run.Chaos` drives it."""

    def __init__(self, settings: Settings, work: Path, echo: bool = False) -> None:
        self.s = settings
        self.work = work
        self.echo = echo
        self.t0 = time.monotonic()
        self.sups: list[SupervisorProcess] = []
        self.trainer_pids: set[int] = set()
        self.instance = 0
        self.boots = 0
        self.new_instances = 0
        self.applied: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.records: list[dict[str, Any]] = []
        self.unexpected_exits: list[dict[str, Any]] = []
        self.s3_rules: list[Rule] = []
        self.finished = False
        self.rng = random.Random(settings.seed * 7919 + 1)
        self.flags = trainer_command(
            settings.steps, settings.save_every, settings.step_seconds, settings.state_mb
        )[3:]

    # -- plumbing -------------------------------------------------------------------

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    @property
    def sup(self) -> SupervisorProcess:
        return self.sups[-1]

    @property
    def local_dir(self) -> Path:
        return self.work / f"instance-{self.instance}" / "checkpoints"

    def boot(self, new_instance: bool) -> None:
        if new_instance or self.instance == 0:
            self.instance += 1
            self.new_instances += 1
        d = self.work / f"instance-{self.instance}"
        d.mkdir(parents=True, exist_ok=True)
        cfg = write_config(
            d / "config.toml",
            run_id=RUN_ID,
            command=trainer_command(
                self.s.steps, self.s.save_every, self.s.step_seconds, self.s.state_mb
            ),
            local_dir=d / "checkpoints",
            remote=f"s3://{BUCKET}/{PREFIX}",
            endpoint_url=self.proxy.url,
            imds_url=self.emulator.url,
            runtime_dir=d / "run",
            poll_interval=0.2,
            extra={
                "checkpoints": {"keep_remote": self.s.keep_remote},
                # A crash budget no chaos run exhausts, and a 1 s backoff between restarts.
                "daemon": {"max_restarts": 1000, "restart_window": 1.0, "rescan_interval": 1},
            },
        )
        env = {**os.environ, **FAKE_AWS_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        self.sups.append(SupervisorProcess(cfg, env, echo=self.echo).start())
        self.boots += 1

    def trainer_pid(self, sup: SupervisorProcess | None = None) -> int | None:
        sup = sup or self.sup
        started = sup.find("child_started")
        if not started:
            return None
        pid = int(started[-1]["pid"])
        self.trainer_pids.add(pid)
        return pid if alive(pid) else None

    def progressing(self) -> bool:
        """The newest trainer has started and printed a step since."""
        lines = lines_of(self.sup)
        idx = max((i for i, ln in enumerate(lines) if '"child_started"' in ln), default=-1)
        return idx >= 0 and any(STEP_LINE_RE.match(ln) for ln in lines[idx + 1 :])

    def current_step(self) -> int:
        for ln in reversed(lines_of(self.sup)):
            m = STEP_LINE_RE.match(ln) or RESUMED_RE.match(ln)
            if m:
                return int(m.group(1))
        return 0

    def kill_trainer_group(self, pid: int | None) -> None:
        """What systemd's cgroup kill does to a dead supervisor's trainer."""
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if not wait_until(lambda: not alive(pid), 10):
            raise InvariantViolation(f"trainer {pid} survived SIGKILL")

    def exited(self) -> bool:
        """The current supervisor has exited: done, or restarted as systemd would."""
        proc = self.sup.proc
        assert proc is not None
        if proc.poll() is None:
            return False
        code = self.sup.wait_exit(10)
        if self.sup.find("run_completed") and code == 0:
            self.finished = True
            return True
        if code == 2:
            raise InvariantViolation("supervisor exited 2 (bad configuration)")
        last = [e.get("event") for e in self.sup.events[-5:]]
        self.unexpected_exits.append({"code": code, "last_events": last})
        self.say(f"supervisor exited {code} on its own ({last}); restarting it")
        self.kill_trainer_group(self.trainer_pid())
        self.boot(new_instance=False)
        return True

    def clear_s3_faults(self) -> None:
        for rule in self.s3_rules:
            self.proxy.remove(rule)
        self.s3_rules.clear()
