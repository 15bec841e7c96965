"""What a trainer's exit means, and what the supervisor does about it (issue 11).

Each test names a defect found in a read of the supervisor: a run marked complete at an
``interrupt`` step, a failed final upload reported as a configuration error, leftovers of
a killed trainer running beside its restart, a healthy trainer killed as hung behind a
slow upload, a drain aborted by its own notice file. Real supervisor processes, moto over
HTTP, the metadata emulator over HTTP; the trainer is tests/scripted_trainer.py, or the
reference trainer where the final hash matters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import SCRIPTED_TRAINER, SUPERVISOR_RUN_ID

from daemon.standins import FAKE_AWS_ENV, LocalS3
from daemon.standins.demo import SupervisorProcess, trainer_command, write_config
from daemon.standins.emulator import MetadataEmulator
from daemon.standins.faultproxy import FaultProxy

REPO = Path(__file__).resolve().parent.parent
COMPLETE_KEY = f"runs/{SUPERVISOR_RUN_ID}/complete.json"


def manifest_reasons(s3_client: Any, bucket: str) -> dict[int, str]:
    out = {}
    prefix = f"runs/{SUPERVISOR_RUN_ID}/checkpoints/"
    for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        if o["Key"].endswith("/manifest.json"):
            doc = json.loads(s3_client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
            out[doc["step"]] = doc["reason"]
    return out


def has_complete(s3_client: Any, bucket: str) -> bool:
    resp = s3_client.list_objects_v2(Bucket=bucket, Prefix=COMPLETE_KEY)
    return bool(resp.get("Contents"))


def start_supervisor(
    tmp_path: Path,
    command: list[str],
    endpoint_url: str,
    bucket: str,
    emulator: MetadataEmulator,
    **daemon: Any,
) -> SupervisorProcess:
    cfg = write_config(
        tmp_path / "config.toml",
        run_id=SUPERVISOR_RUN_ID,
        command=command,
        local_dir=tmp_path / "ckpt",
        remote=f"s3://{bucket}/runs",
        endpoint_url=endpoint_url,
        imds_url=emulator.url,
        runtime_dir=tmp_path / "run",
        poll_interval=0.2,
        extra={"daemon": daemon},
    )
    env = {**os.environ, **FAKE_AWS_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return SupervisorProcess(cfg, env).start()


# --- completion means `final` ----------------------------------------------------------


def test_direct_sigterm_to_the_trainer_does_not_complete_the_run(
    boot: Any, s3_client: Any, bucket: str
) -> None:
    """Defect: a trainer exit 0 wrote complete.json whatever the newest checkpoint's reason,
    so an operator's `kill` (or a peer rank's stop) ended the run forever mid-way."""
    sup = boot("40", "--step-seconds", "0.1", "--save-every", "5")
    first = sup.wait_for(lambda e: e.get("event") == "child_started", 30, "the trainer")
    sup.wait_for_line("resumed", 30)
    time.sleep(1.0)
    os.kill(first["pid"], signal.SIGTERM)  # straight to the trainer, not the supervisor
    stopped = sup.wait_for(
        lambda e: e.get("event") == "trainer_stopped_elsewhere", 30, "the stop to be noticed"
    )
    assert stopped["reason"] == "interrupt" and stopped["progressed"] is True
    assert not has_complete(s3_client, bucket)
    assert sup.wait_exit(90) == 0
    # The interrupt checkpoint was committed (retention, keep 3, may have deleted it since).
    assert stopped["step"] in [e["step"] for e in sup.find("checkpoint_committed")]
    assert manifest_reasons(s3_client, bucket)[40] == "final"
    starts = sup.find("child_started")
    assert len(starts) == 2
    resumed = [ln for ln in sup.lines if ln.startswith("resumed")]
    assert resumed == ["resumed step=0", f"resumed step={stopped['step']}"]
    assert not [e for e in sup.events if e.get("phase") == "backoff" and "exit code" in e["why"]]
    assert sup.find("run_completed")[0]["step"] == 40


@pytest.mark.slow
def test_direct_sigterm_resumes_to_the_uninterrupted_final_hash(
    tmp_path: Path, s3_server: LocalS3, s3_client: Any, bucket: str, emulator: MetadataEmulator
) -> None:
    """The same defect with the reference trainer: the stopped run resumes and ends with
    the hash of a run never interrupted."""
    command = trainer_command(steps=30, save_every=10, step_seconds=0.1)
    env = {**os.environ, "SPOT_CHECKPOINT_DIR": str(tmp_path / "ref"), "SPOT_RUN_ID": "ref"}
    ref = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr
    want = re.findall(r"^final_params_sha256=([0-9a-f]{64})$", ref.stdout, re.M)
    assert len(want) == 1

    sup = start_supervisor(tmp_path, command, s3_server.endpoint_url, bucket, emulator)
    first = sup.wait_for(lambda e: e.get("event") == "child_started", 60, "the trainer")
    sup.wait_for(
        lambda e: e.get("event") == "checkpoint_committed" and e["step"] >= 10, 120, "step 10"
    )
    os.kill(first["pid"], signal.SIGTERM)
    stopped = sup.wait_for(
        lambda e: e.get("event") == "trainer_stopped_elsewhere", 60, "the stop to be noticed"
    )
    assert stopped["reason"] == "interrupt"
    assert sup.wait_exit(240) == 0
    got = [ln.split("=", 1)[1] for ln in sup.lines if ln.startswith("final_params_sha256=")]
    assert got == want
    assert manifest_reasons(s3_client, bucket)[30] == "final"
    assert has_complete(s3_client, bucket)


def test_a_command_that_exits_0_without_ever_saving_final_is_not_restarted_forever(
    boot: Any, s3_client: Any, bucket: str
) -> None:
    """A command that ends with a `periodic` save is restarted once (it may have been
    stopped); restarted, it gets nowhere, which counts as a failure: the supervisor gives
    up instead of looping, and never writes complete.json."""
    sup = boot("6", "--no-final", max_restarts=1, restart_window=600)
    assert sup.wait_exit(60) == 1
    stopped = sup.find("trainer_stopped_elsewhere")
    # max_restarts=1: the second failure in the window (two starts that got nowhere) gives up.
    assert [e["progressed"] for e in stopped] == [True, False, False]
    assert sup.find("supervisor_gave_up")
    assert not has_complete(s3_client, bucket)
    assert 6 in manifest_reasons(s3_client, bucket)


def test_final_upload_failure_exits_1_not_a_missing_checkpoint(
    tmp_path: Path, s3_server: LocalS3, s3_client: Any, bucket: str, emulator: MetadataEmulator
) -> None:
    """Defect: a finished run whose commits all failed exited 2 ("no checkpoint was
    written"), which systemd never retries; the checkpoint was on disk all along."""
    with FaultProxy(s3_server.endpoint_url, seed=1) as proxy:
        proxy.error(403, "AccessDenied", method="PUT", path="/checkpoints/")
        proxy.error(403, "AccessDenied", method="POST", path="/checkpoints/")
        sup = start_supervisor(
            tmp_path,
            [sys.executable, SCRIPTED_TRAINER, "5"],
            proxy.url,
            bucket,
            emulator,
        )
        assert sup.wait_exit(60) == 1
    assert sup.find("final_commit_failed")
    assert not sup.find("final_checkpoint_missing")
    assert (tmp_path / "ckpt" / "step-000000005" / "manifest.json").exists()
    assert not has_complete(s3_client, bucket)


# --- a killed trainer leaves nothing behind ----------------------------------------------


def test_a_sigkilled_trainer_leaves_no_helper_process_behind(boot: Any, tmp_path: Path) -> None:
    """Defect: after a crash only the main pid was reaped; its helpers (data-loader
    workers, torchrun's ranks in their own sessions) ran on beside the restarted trainer."""
    pid_file = tmp_path / "helpers.pid"
    sup = boot("30", "--step-seconds", "0.1", "--leave-helpers", str(pid_file), max_restarts=3)
    first = sup.wait_for(lambda e: e.get("event") == "child_started", 30, "the trainer")
    sup.wait_for_line("helpers_started", 30)
    helpers = [int(p) for p in pid_file.read_text().split()]
    assert all(psutil.pid_exists(p) for p in helpers)
    os.kill(first["pid"], signal.SIGKILL)
    second = sup.wait_for(
        lambda e: e.get("event") == "child_started" and e["pid"] != first["pid"], 60, "restart"
    )
    killed = sup.find("child_leftovers_killed")
    assert len(killed) == 1 and sorted(killed[0]["killed"]) == sorted(helpers)
    assert killed[0]["still_alive"] == []
    assert sup.events.index(killed[0]) < sup.events.index(second)
    for pid in helpers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert sup.wait_exit(60) == 0


# --- the background sync: progress is what lands on disk --------------------------------


def test_a_slow_upload_never_gets_a_healthy_trainer_killed_as_hung(
    tmp_path: Path, s3_server: LocalS3, bucket: str, emulator: MetadataEmulator
) -> None:
    """Defect: progress was counted when a sync pass started, so a trainer checkpointing
    every 0.3 s behind an upload slower than progress_timeout was killed as hung."""
    with FaultProxy(s3_server.endpoint_url, seed=2) as proxy:
        # 256 KiB checkpoints at 40 KB/s: one upload takes ~6 s, twice the 3 s limit.
        proxy.throttle(40_000, "request", method="PUT")
        sup = start_supervisor(
            tmp_path,
            [sys.executable, SCRIPTED_TRAINER, "40", "--step-seconds", "0.3", "--state-kb", "256"],
            proxy.url,
            bucket,
            emulator,
            progress_timeout=3,
            stop_budget=40,
        )
        sup.wait_for(lambda e: e.get("event") == "child_started", 30, "the trainer")
        # The first pass starts within a second and is then busy for several seconds.
        time.sleep(9)
        assert not sup.find("trainer_hung"), "\n".join(sup.lines[-30:])
        assert len(sup.find("child_started")) == 1
        assert sup.proc is not None
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.wait_exit(90) == 0
    assert not sup.find("trainer_hung")


# --- the drain cannot be aborted by its own bookkeeping ----------------------------------


def test_an_unwritable_notice_file_still_sends_sigterm(
    boot: Any, emulator: MetadataEmulator, tmp_path: Path
) -> None:
    """Defect: a failure to write the notice file raised out of the drain, before SIGTERM."""
    sup = boot("100000", "--step-seconds", "0.05", "--save-every", "1000")
    sup.wait_for_line("resumed", 30)
    # A directory where the file should go: the atomic rename over it fails (as root too).
    (tmp_path / "run" / "notice.json").mkdir(parents=True)
    (tmp_path / "run" / "notice.json" / "keep").write_text("x")
    emulator.set_notice("terminate")
    assert sup.wait_exit(60) == 0
    assert sup.find("notice_file_unwritable")
    sent = [e for e in sup.find("child_signalled") if e["signal"] == "SIGTERM"]
    assert len(sent) == 1
    assert sup.find("emergency_committed")
    assert [ln for ln in sup.lines if "reason=interrupt" in ln]


def test_notice_file_deadline_is_the_drain_deadline(
    boot: Any, emulator: MetadataEmulator, tmp_path: Path
) -> None:
    """Defect: the notice file named the instance's time, not when the trainer is killed,
    so the trainer's "is there time to save?" check ran on the wrong clock."""
    import datetime as dt

    sup = boot("100000", "--step-seconds", "0.05", "--save-every", "1000", safety_margin=7)
    sup.wait_for_line("resumed", 30)
    at = emulator.set_notice(
        "terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60)
    )
    assert sup.wait_exit(60) == 0
    doc = json.loads((tmp_path / "run" / "notice.json").read_text())
    deadline = dt.datetime.strptime(doc["deadline"], "%Y-%m-%dT%H:%M:%SZ")
    instance = dt.datetime.strptime(doc["instance_deadline"], "%Y-%m-%dT%H:%M:%SZ")
    assert instance.replace(tzinfo=dt.timezone.utc) == at.replace(microsecond=0)
    draining = next(e for e in sup.events if e.get("phase") == "draining")
    # The drain deadline is the safety margin plus the upload reserve before the notice.
    before = (instance - deadline).total_seconds()
    assert draining["safety_margin_s"] == 7
    assert abs(before - (7 + draining["upload_reserve_s"])) <= 1.0
