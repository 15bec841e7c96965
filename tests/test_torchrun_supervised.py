"""The supervisor running ``torchrun`` itself as the training command (2 ranks, gloo).

torchrun's agent dies of SIGUSR1, and SIGKILLs its workers 30 s after it forwards a
SIGTERM. So both signals go to the workers: a rebalance recommendation's SIGUSR1 gets an
early, committed checkpoint while training and the agent go on; a notice's SIGTERM makes
both ranks save the same step and exit 0, the agent exits 0 after them, and the
supervisor commits the step before the notice's time and exits 0.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from test_end_to_end import committed_manifests

from daemon.standins import FAKE_AWS_ENV, LocalS3
from daemon.standins.demo import SupervisorProcess, write_config
from daemon.standins.emulator import MetadataEmulator

pytestmark = pytest.mark.slow

RUN_ID = "torchrun-run"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def manifests(s3_client: Any, bucket: str) -> dict[int, dict[str, Any]]:
    return committed_manifests(s3_client, bucket, f"runs/{RUN_ID}/")


def test_rebalance_and_notice_reach_torchrun_workers(
    tmp_path: Path, s3_server: LocalS3, s3_client: Any, bucket: str, emulator: MetadataEmulator
) -> None:
    command = [
        TORCHRUN,
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "trainer.example",
        "--device=cpu",
        "--steps=100000",
        "--save-every=100000",
        "--step-seconds=0.05",
    ]
    cfg = write_config(
        tmp_path / "config.toml",
        run_id=RUN_ID,
        command=command,
        local_dir=tmp_path / "ckpt",
        remote=f"s3://{bucket}/runs",
        endpoint_url=s3_server.endpoint_url,
        imds_url=emulator.url,
        runtime_dir=tmp_path / "run",
        poll_interval=0.5,
        extra={"run": {"workdir": str(REPO), "env": {"OMP_NUM_THREADS": "1"}}},
    )
    env = {**os.environ, **FAKE_AWS_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    sup = SupervisorProcess(cfg, env).start()
    try:
        sup.wait_for_line("step=5 ", 180)
        # A rebalance recommendation: SIGUSR1 to the workers, not to the agent.
        emulator.set_rebalance()
        asked = sup.wait_for(lambda e: e["event"] == "early_checkpoint_requested", 30, "SIGUSR1")
        assert asked["child_signalled"] is True
        signalled = [e for e in sup.find("child_signalled") if e["signal"] == "SIGUSR1"]
        assert len(signalled[0]["workers"]) == 2
        early = sup.wait_for(lambda e: e["event"] == "checkpoint_committed", 60, "early commit")
        assert manifests(s3_client, bucket)[early["step"]]["reason"] == "requested"
        assert manifests(s3_client, bucket)[early["step"]]["world_size"] == 2
        assert not sup.find("child_exited")  # the agent survived SIGUSR1; training goes on
        after = early["step"] + 5
        sup.wait_for_line(f"step={after} ", 60)
        # The notice: SIGTERM to both ranks.
        notice_time = emulator.set_notice(
            "terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=40)
        )
        assert sup.wait_exit(90) == 0
        assert dt.datetime.now(dt.timezone.utc) < notice_time
    finally:
        if sup.proc is not None and sup.proc.poll() is None:
            sup.proc.kill()
            sup.proc.wait()
    emergency = sup.find("emergency_committed")
    assert len(emergency) == 1, sup.events[-10:]
    step = emergency[0]["committed_step"]
    assert step > after
    committed = manifests(s3_client, bucket)
    assert max(committed) == step
    assert committed[step]["reason"] == "interrupt" and committed[step]["world_size"] == 2
    names = {f["path"] for f in committed[step]["files"]}
    assert {"rng.pt", "rng-rank00001.pt"} <= names
    # Both ranks stopped at the step they agreed on; the agent saw them succeed.
    assert [ln for ln in sup.lines if ln.startswith("stopped")] == [f"stopped step={step}"]
    term = [e for e in sup.find("child_signalled") if e["signal"] == "SIGTERM"]
    assert len(term) == 1 and len(term[0]["workers"]) == 2
    assert sup.find("child_exited")[-1]["returncode"] == 0
    assert not sup.find("child_tree_killed")
