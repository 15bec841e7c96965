"""The supervisor's lifecycle with real processes: crashes and restarts, giving up, a stop
of the supervisor itself, and a trainer that ignores SIGTERM. The trainer here is a
torch-free script (tests/scripted_trainer.py) so each case takes seconds."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from conftest import SCRIPTED_TRAINER as SCRIPT
from conftest import SUPERVISOR_RUN_ID as RUN_ID

from daemon.standins import FAKE_AWS_ENV, LocalS3
from daemon.standins.demo import SupervisorProcess, write_config
from daemon.standins.emulator import MetadataEmulator


def committed_steps(s3_client: Any, bucket: str) -> list[int]:
    resp = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"runs/{RUN_ID}/checkpoints/")
    return sorted(
        int(o["Key"].split("/")[-2][5:])
        for o in resp.get("Contents", [])
        if o["Key"].endswith("/manifest.json")
    )


def test_crashed_trainer_is_restarted_and_resumes(
    boot: Any, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    prom = tmp_path / "textfile" / "spot.prom"
    sup = boot("8", "--crash-at", "5", max_restarts=3, metrics=str(prom))
    assert sup.wait_exit(60) == 0
    starts = sup.find("child_started")
    assert len(starts) == 2
    backoff = [e for e in sup.events if e.get("phase") == "backoff"]
    assert len(backoff) == 1 and "exit code 3" in backoff[0]["why"]
    resumed = [ln for ln in sup.lines if ln.startswith("resumed")]
    assert resumed == ["resumed step=0", "resumed step=4"]
    assert sup.find("run_completed")[0]["step"] == 8
    assert 8 in committed_steps(s3_client, bucket)
    # The Prometheus textfile, as node_exporter would read it after the run.
    text = prom.read_text()
    assert f'spot_supervisor_trainer_restarts_total{{run_id="{RUN_ID}"}} 1' in text
    assert f'spot_supervisor_newest_committed_step{{run_id="{RUN_ID}"}} 8' in text
    assert f'spot_supervisor_phase{{run_id="{RUN_ID}",phase="done"}} 1' in text
    committed = [ln for ln in text.splitlines() if ln.startswith("spot_supervisor_checkpoints_")]
    assert committed and float(committed[0].split()[-1]) >= 1


def test_a_hung_trainer_is_killed_and_restarted(
    boot: Any, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    sup = boot("12", "--hang-at", "6", progress_timeout=3, max_restarts=3)
    assert sup.wait_exit(90) == 0
    hung = sup.find("trainer_hung")
    assert len(hung) == 1
    # Steps 1-5 were saved; step 6 never came. Counted from the last checkpoint, not the start.
    assert hung[0]["newest_local_step"] == 5 and hung[0]["seconds_without_checkpoint"] >= 3
    killed = sup.find("child_tree_killed")
    assert len(killed) == 1 and "progress_timeout" in killed[0]["why"]
    backoff = [e for e in sup.events if e.get("phase") == "backoff"]
    assert len(backoff) == 1 and backoff[0]["why"].startswith("trainer hung: no new checkpoint")
    resumed = [ln for ln in sup.lines if ln.startswith("resumed")]
    assert resumed == ["resumed step=0", "resumed step=5"]
    assert sup.find("run_completed")[0]["step"] == 12
    assert 12 in committed_steps(s3_client, bucket)


def test_a_trainer_checkpointing_within_progress_timeout_is_left_alone(
    boot: Any, s3_client: Any, bucket: str
) -> None:
    # A checkpoint every ~1.2 s, well inside a 3 s limit: never taken for hung.
    sup = boot("6", "--step-seconds", "0.4", "--save-every", "3", progress_timeout=3)
    assert sup.wait_exit(60) == 0
    assert not sup.find("trainer_hung") and len(sup.find("child_started")) == 1


def test_gives_up_after_too_many_failures(boot: Any, s3_client: Any, bucket: str) -> None:
    sup = boot("8", "--always-crash", max_restarts=1, restart_window=600)
    assert sup.wait_exit(60) == 1
    assert len(sup.find("child_started")) == 2
    gave_up = sup.find("supervisor_gave_up")
    assert len(gave_up) == 1 and "failed 2 times" in gave_up[0]["why"]
    # What was complete was committed before giving up.
    assert max(committed_steps(s3_client, bucket)) == gave_up[0]["committed_step"] == 2
    assert [e for e in sup.events if e["event"] == "phase_changed"][-1]["phase"] == "failed"


def test_stop_of_the_supervisor_is_forwarded_and_committed(
    boot: Any, tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    sup = boot("10000", "--step-seconds", "0.1", stop_budget=20)
    sup.wait_for(lambda e: e.get("event") == "checkpoint_committed", 60, "a first commit")
    assert sup.proc is not None
    sup.proc.send_signal(signal.SIGTERM)  # what `systemctl stop` does
    assert sup.wait_exit(60) == 0
    notice = json.loads((tmp_path / "run" / "notice.json").read_text())
    assert notice["action"] == "shutdown" and notice["source"] == "signal"
    deadline = dt.datetime.strptime(notice["deadline"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.timezone.utc
    )
    assert 0 < (deadline - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 20
    interrupt = [ln for ln in sup.lines if "reason=interrupt" in ln]
    assert len(interrupt) == 1
    step = int(interrupt[0].split()[1].split("=")[1])
    assert sup.find("emergency_committed")[0]["committed_step"] == step
    assert max(committed_steps(s3_client, bucket)) == step


def test_trainer_ignoring_sigterm_is_killed_and_committed_checkpoint_stands(
    boot: Any, emulator: MetadataEmulator, s3_client: Any, bucket: str
) -> None:
    sup = boot("10000", "--ignore-sigterm", "--step-seconds", "0.2", safety_margin=2)
    sup.wait_for(lambda e: e.get("event") == "checkpoint_committed", 60, "a first commit")
    before = max(committed_steps(s3_client, bucket))
    emulator.set_notice("terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=6))
    assert sup.wait_exit(60) == 0
    killed = sup.find("child_tree_killed")
    assert len(killed) == 1 and killed[0]["why"] == "drain deadline reached"
    assert sup.find("drain_deadline_reached")
    exited = sup.find("child_exited")[-1]
    assert exited["signal"] == "SIGKILL"
    after = committed_steps(s3_client, bucket)
    # The newest committed checkpoint stands (later periodic ones may have been committed
    # while the trainer ran on), and it is complete.
    assert max(after) >= before
    phases = [e["phase"] for e in sup.events if e.get("event") == "phase_changed"]
    assert phases[-3:] == ["draining", "uploading", "done"]


def test_missing_bucket_at_boot_fails_clearly_and_touches_nothing(
    tmp_path: Path, s3_server: LocalS3, emulator: MetadataEmulator
) -> None:
    local = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "config.toml",
        run_id=RUN_ID,
        command=[sys.executable, SCRIPT, "5"],
        local_dir=local,
        remote="s3://bucket-that-does-not-exist/runs",
        endpoint_url=s3_server.endpoint_url,
        imds_url=emulator.url,
        runtime_dir=tmp_path / "run",
    )
    env = {**os.environ, **FAKE_AWS_ENV, "PYTHONPATH": str(Path(SCRIPT).parent.parent)}
    sup = SupervisorProcess(cfg, env).start()
    assert sup.wait_exit(60) == 1
    failed = sup.find("boot_failed")
    assert len(failed) == 1 and "bucket-that-does-not-exist" in failed[0]["error"]
    assert not sup.find("child_started")
