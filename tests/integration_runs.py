"""Runs the framework reference scripts (trainer.example_hf, _lightning, _accelerate).

Shared by the tests/test_integrations_*.py files (no tests here): a script as a real
subprocess with its stdout followed line by line, and the supervisor story (first
boot, notice after the first commit, a fresh instance resuming) for one script.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.standins import FAKE_AWS_ENV
from daemon.standins.demo import SupervisorProcess, write_config
from daemon.standins.emulator import MetadataEmulator

REPO = Path(__file__).resolve().parent.parent
FINAL_RE = re.compile(r"^final_params_sha256=([0-9a-f]{64})$")
STEP_RE = re.compile(r"^step=(\d+) loss=")
SAVED_RE = re.compile(r"^checkpoint_saved step=(\d+) reason=(\w+) bytes=\d+$")
STOPPED_RE = re.compile(r"^stopped step=(\d+)$")
START_RE = re.compile(r"^(?:start step=0|resumed step=(\d+) reason=\w+)$")


def script_env(**extra: str) -> dict[str, str]:
    """The environment a script runs in: offline, one thread, unbuffered, this checkout."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        # The runs are tiny, and the tests share two cores.
        OMP_NUM_THREADS="1",
        # Nothing is downloaded: models are built from configs.
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    env.pop("SPOT_NOTICE_FILE", None)
    env.update(extra)
    return env


class Script:
    """``python -m <module> <args>`` with ``$SPOT_CHECKPOINT_DIR`` set, stdout followed."""

    def __init__(self, module: str, ckpt_dir: Path, *args: str) -> None:
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        self.stderr_path = ckpt_dir.parent / f"{ckpt_dir.name}-{time.monotonic_ns()}.stderr"
        env = script_env(SPOT_CHECKPOINT_DIR=str(ckpt_dir), SPOT_RUN_ID="test-run")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=REPO,
                env=env,
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

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 90) -> re.Match[str]:
        """The first line (from now on) matching ``pattern``; fails on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern.pattern} in {timeout}s\n{self.report()}")
            if line is None:
                pytest.fail(f"exited before {pattern.pattern}\n{self.report()}")
            self.lines.append(line)
            m = pattern.match(line)
            if m:
                return m

    def finish(self, timeout: float = 90) -> int:
        """Wait for exit and drain stdout; the exit status."""
        rc = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc

    def saved(self) -> list[tuple[int, str]]:
        """``(step, reason)`` of every ``checkpoint_saved`` line so far."""
        return [(int(m[1]), m[2]) for line in self.lines if (m := SAVED_RE.match(line))]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def report(self) -> str:
        return "stdout:\n" + "\n".join(self.lines[-40:]) + "\nstderr:\n" + self.stderr()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def final_hash(script: Script, timeout: float = 120) -> str:
    """Run ``script`` to its end: its final_params_sha256 (exit 0 checked)."""
    try:
        h = script.wait_for(FINAL_RE, timeout=timeout)[1]
        assert script.finish() == 0, script.report()
    finally:
        script.kill()
    return h


def committed(s3_client: Any, bucket: str, prefix: str) -> dict[int, dict[str, Any]]:
    """Every committed manifest under ``prefix``, by step."""
    out = {}
    resp = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    for obj in resp.get("Contents", []):
        if obj["Key"].endswith("/manifest.json"):
            doc = json.loads(s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            out[doc["step"]] = doc
    return out


def wait_line(
    sup: SupervisorProcess, pred: Callable[[str], bool], timeout: float, after: int = 0
) -> str:
    """The first output line of ``sup`` (from line ``after`` on) matching ``pred``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next((ln for ln in list(sup.lines)[after:] if pred(ln)), None)
        if found is not None:
            return found
        time.sleep(0.1)
    pytest.fail("no such line; last output:\n" + "\n".join(sup.lines[-40:]))


def supervised_resume(
    module: str,
    args: list[str],
    tmp_path: Path,
    endpoint_url: str,
    s3_client: Any,
    bucket: str,
    emulator: MetadataEmulator,
) -> dict[str, Any]:
    """The spot story for one script under real ``spot-supervisor run`` processes.

    A reference run (no supervisor) goes alongside. Boot 1: a rebalance recommendation
    (SIGUSR1: a ``requested`` save, training goes on), then, after a commit, a spot
    notice (SIGTERM: an ``interrupt`` save, committed, exit). Boot 2, a fresh instance
    (new empty local dir, same bucket and run id): restore, resume, complete on a
    ``final`` checkpoint. Returns what the caller checks further.
    """
    run_id = "integration-run"
    command = [sys.executable, "-m", module, *args]
    env = script_env(**FAKE_AWS_ENV)

    def config_for(instance: str) -> Path:
        return write_config(
            tmp_path / f"{instance}.toml",
            run_id=run_id,
            command=command,
            local_dir=tmp_path / instance / "checkpoints",
            remote=f"s3://{bucket}/runs",
            endpoint_url=endpoint_url,
            imds_url=emulator.url,
            runtime_dir=tmp_path / instance / "run",
            poll_interval=0.2,
        )

    reference = Script(module, tmp_path / "reference" / "checkpoints", *args)
    boot1 = SupervisorProcess(config_for("a"), env).start()
    try:
        boot1.wait_for(lambda e: e.get("event") == "checkpoint_committed", 120, "a commit")
        emulator.set_rebalance()
        boot1.wait_for(
            lambda e: e.get("event") == "early_checkpoint_requested", 30, "the rebalance"
        )
        signalled = len(boot1.lines)
        # SIGUSR1 is answered by the next save: a requested one, or the periodic one when
        # it lands on a save_every boundary (a request at a saved step is not saved twice).
        answer = wait_line(boot1, lambda ln: bool(SAVED_RE.match(ln)), 60, after=signalled)
        assert re.search(r"reason=(requested|periodic) ", answer), answer
        emulator.clear_rebalance()
        emulator.set_notice(
            "terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
        )
        assert boot1.wait_exit(90) == 0, "\n".join(boot1.lines[-40:])
    finally:
        if boot1.proc is not None and boot1.proc.poll() is None:
            boot1.proc.kill()
    emergency = boot1.find("emergency_committed")
    assert len(emergency) == 1, "\n".join(boot1.lines[-40:])
    interrupt_step = emergency[0]["committed_step"]
    stopped = [ln for ln in boot1.lines if STOPPED_RE.match(ln)]
    assert stopped == [f"stopped step={interrupt_step}"], "\n".join(boot1.lines[-40:])
    exits = boot1.find("child_exited")
    assert exits and exits[-1]["returncode"] == 0
    manifests = committed(s3_client, bucket, f"runs/{run_id}/")
    assert manifests[interrupt_step]["reason"] == "interrupt"
    assert max(manifests) == interrupt_step

    emulator.clear_notice()
    boot2 = SupervisorProcess(config_for("b"), env).start()
    try:
        restored = boot2.wait_for(lambda e: e.get("event") == "restore_finished", 60, "restore")
        assert restored["step"] == interrupt_step
        resumed = boot2.wait_for_line("resumed", 90)
        assert resumed.startswith(f"resumed step={interrupt_step} reason=interrupt"), resumed
        assert boot2.wait_exit(180) == 0, "\n".join(boot2.lines[-40:])
    finally:
        if boot2.proc is not None and boot2.proc.poll() is None:
            boot2.proc.kill()
    want = final_hash(reference)
    finals = [m[1] for ln in boot2.lines if (m := FINAL_RE.match(ln))]
    assert finals == [want], "\n".join(boot2.lines[-40:])
    steps = int(args[args.index("--steps") + 1])
    assert boot2.find("run_completed")[0]["step"] == steps
    manifests = committed(s3_client, bucket, f"runs/{run_id}/")
    assert manifests[steps]["reason"] == "final"
    complete = s3_client.get_object(Bucket=bucket, Key=f"runs/{run_id}/complete.json")
    assert json.loads(complete["Body"].read())["step"] == steps
    return {"boot1": boot1, "boot2": boot2, "interrupt_step": interrupt_step, "hash": want}
