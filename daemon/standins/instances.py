"""Simulated instances of one run on this machine, for the tests and the bench.

Each instance has its own metadata emulator (its own instance id), local dir, runtime
dir and ``spot-supervisor run``; they share one bucket (S3 over HTTP). The tests of
several nodes and of standbys (``tests/test_multinode.py``, ``tests/test_standby.py``)
and ``bench/bench_fleet.py`` boot them. What must not live here: what a test or a bench
row does with them (notices, waits, measurements).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import psutil

from daemon.child import TRAINER_TOKEN_ENV
from daemon.standins.demo import SupervisorProcess, write_config
from daemon.standins.emulator import MetadataEmulator
from daemon.standins.s3 import FAKE_AWS_ENV

REPO = Path(__file__).resolve().parents[2]


class Instances:
    """Boots supervisors of one run; each boot is a new instance (instance id ``i-<name>``).

    ``command`` is the trainer every boot runs unless :meth:`boot` names another.
    """

    def __init__(
        self,
        tmp: Path,
        endpoint_url: str,
        bucket: str,
        run_id: str,
        command: list[str] | None = None,
        poll_interval: float = 0.2,
    ) -> None:
        self.tmp, self.endpoint_url, self.bucket = tmp, endpoint_url, bucket
        self.run_id, self.command, self.poll_interval = run_id, command, poll_interval
        self.emulators: list[MetadataEmulator] = []
        self.procs: list[SupervisorProcess] = []

    def boot(
        self,
        name: str,
        *,
        command: list[str] | None = None,
        run: dict[str, Any] | None = None,
        s3: dict[str, Any] | None = None,
        metrics: str | None = None,
        **daemon: Any,
    ) -> tuple[SupervisorProcess, MetadataEmulator]:
        """Start instance ``name``: its emulator, config (``run``, ``s3``, ``daemon`` keys
        added to the stand-ins' defaults) and supervisor."""
        command = command or self.command
        if command is None:
            raise ValueError("no command: pass one here or to Instances")
        emulator = MetadataEmulator(instance_id=f"i-{name:0>17}").start()
        self.emulators.append(emulator)
        cfg = write_config(
            self.tmp / f"{name}.toml",
            run_id=self.run_id,
            command=command,
            local_dir=self.tmp / name / "ckpt",
            remote=f"s3://{self.bucket}/runs",
            endpoint_url=self.endpoint_url,
            imds_url=emulator.url,
            runtime_dir=self.tmp / name / "run",
            poll_interval=self.poll_interval,
            extra={
                "run": run or {},
                "s3": s3 or {},
                "daemon": {"stop_budget": 60, **daemon},
                **({"metrics": {"textfile": metrics}} if metrics else {}),
            },
        )
        env = {**os.environ, **FAKE_AWS_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        proc = SupervisorProcess(cfg, env).start()
        self.procs.append(proc)
        return proc, emulator

    def close(self) -> None:
        """Kill every instance still running (its whole tree); stop every emulator."""
        for p in self.procs:
            if p.proc is not None and p.proc.poll() is None:
                kill_instance(p)
        for e in self.emulators:
            e.stop()


def process_env(p: psutil.Process) -> dict[str, str]:
    """``p``'s environment; empty when it cannot be read (gone, or not ours)."""
    try:
        return p.environ()
    except psutil.Error:
        return {}


def kill_instance(sup: SupervisorProcess) -> None:
    """SIGKILL a whole instance: the supervisor and everything under it (no notice)."""
    assert sup.proc is not None
    root = psutil.Process(sup.proc.pid)
    victims = [root, *root.children(recursive=True)]
    tokens = {process_env(p).get(TRAINER_TOKEN_ENV) for p in victims} - {None}
    if tokens:  # the trainer's tree lives in its own session: find all of it
        victims += [
            q for q in psutil.process_iter() if process_env(q).get(TRAINER_TOKEN_ENV) in tokens
        ]
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.kill()
    sup.proc.wait(timeout=30)
