"""Runs the framework reference scripts (trainer.example_hf, _lightning, _accelerate).

Shared by the tests/test_integrations_*.py files (no tests here): a script as a real
subprocess with its stdout followed line by line, and the supervisor story (first
boot, notice after the first commit, a fresh instance resuming) for one script.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from followed import FINAL_RE, REPO, SAVED_RE, STOPPED_RE, FollowedProcess, child_env

from daemon.standins import FAKE_AWS_ENV
from daemon.standins.demo import SupervisorProcess, write_config
from daemon.standins.emulator import MetadataEmulator


def script_env(**extra: str) -> dict[str, str]:
    """The environment a script runs in: offline, one thread, unbuffered, this checkout."""
    offline = {
        "PYTHONPATH": str(REPO),
        # Nothing is downloaded: models are built from configs.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    return child_env({**offline, **extra})


class Script(FollowedProcess):
    """``python -m <module> <args>`` with ``$SPOT_CHECKPOINT_DIR`` set, stdout followed."""

    timeout = 90
    what = "the script"

    def __init__(self, module: str, ckpt_dir: Path, *args: str) -> None:
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [sys.executable, "-m", module, *args],
            script_env(SPOT_CHECKPOINT_DIR=str(ckpt_dir), SPOT_RUN_ID="test-run"),
            ckpt_dir.parent / f"{ckpt_dir.name}-{time.monotonic_ns()}.stderr",
        )


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
