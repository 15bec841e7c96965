"""The one-shot subcommands as a user runs them: check, sync, restore, status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon import layout
from daemon.demo import write_config
from daemon.emulator import MetadataEmulator
from daemon.standins import FAKE_AWS_ENV, LocalS3
from daemon.state import Phase, StateMachine

RUN_ID = "cli-run"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **FAKE_AWS_ENV},
    )


def make_config(
    tmp_path: Path, s3: LocalS3, bucket: str, imds_url: str, local: str = "local"
) -> Path:
    return write_config(
        tmp_path / f"{local}.toml",
        run_id=RUN_ID,
        command=[sys.executable, "-c", "pass"],
        local_dir=tmp_path / local,
        remote=f"s3://{bucket}/p",
        endpoint_url=s3.endpoint_url,
        imds_url=imds_url,
        runtime_dir=tmp_path / "run",
    )


def write_checkpoint(local_dir: Path, step: int, payload: bytes) -> None:
    with layout.CheckpointWriter(local_dir, RUN_ID, step, "periodic") as w:
        w.add_bytes("model.pt", payload)
        w.add_bytes("optimizer.pt", payload[::-1])
        w.commit()


def test_check_passes_on_a_good_setup(
    tmp_path: Path, s3_server: LocalS3, bucket: str, emulator: MetadataEmulator
) -> None:
    r = cli("check", "--config", str(make_config(tmp_path, s3_server, bucket, emulator.url)))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == [
        "ok   config",
        "ok   local dir",
        "ok   command",
        "ok   metadata",
        "ok   bucket",
    ]
    assert "no notice pending" in r.stdout


def test_check_stops_at_an_unreachable_metadata_service(
    tmp_path: Path, s3_server: LocalS3, bucket: str
) -> None:
    cfg = make_config(tmp_path, s3_server, bucket, "http://127.0.0.1:9")
    r = cli("check", "--config", str(cfg))
    assert r.returncode == 1
    last = r.stdout.splitlines()[-1]
    assert last.startswith("FAIL metadata: ") and "127.0.0.1:9" in last and "refused" in last
    assert "bucket" not in r.stdout  # stops at the first hard failure


def test_check_names_a_missing_bucket(
    tmp_path: Path, s3_server: LocalS3, emulator: MetadataEmulator
) -> None:
    r = cli("check", "--config", str(make_config(tmp_path, s3_server, "no-such-bkt", emulator.url)))
    assert r.returncode == 1
    assert "FAIL bucket" in r.stdout and "no-such-bkt" in r.stdout


def test_sync_then_restore_on_an_empty_disk(
    tmp_path: Path, s3_server: LocalS3, s3_client: Any, bucket: str
) -> None:
    cfg = make_config(tmp_path, s3_server, bucket, "http://127.0.0.1:9")
    local = tmp_path / "local"
    for step in (10, 20, 30):
        write_checkpoint(local, step, os.urandom(100_000) + bytes([step]))
    r = cli("sync", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "committed 3 checkpoint(s); newest committed step: 30" in r.stdout
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="p/")["Contents"]}
    for step in (10, 20, 30):
        assert f"p/{RUN_ID}/checkpoints/step-{step:09d}/manifest.json" in keys

    cfg2 = make_config(tmp_path, s3_server, bucket, "http://127.0.0.1:9", local="fresh")
    r = cli("restore", "--config", str(cfg2))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "restored step 30" in r.stdout
    restored = tmp_path / "fresh" / "step-000000030"
    assert layout.load_complete(restored).step == 30
    assert (restored / "model.pt").read_bytes() == (
        local / "step-000000030" / "model.pt"
    ).read_bytes()

    # A second restore keeps what is there; after complete.json, restore does nothing.
    assert "kept the newer local step 30" in cli("restore", "--config", str(cfg2)).stdout
    s3_client.put_object(
        Bucket=bucket, Key=f"p/{RUN_ID}/complete.json", Body=b'{"step": 30, "completed_at": "x"}'
    )
    r = cli("restore", "--config", str(cfg2))
    assert r.returncode == 0 and "is complete (step 30): nothing to restore" in r.stdout


def test_status_without_a_daemon(tmp_path: Path, s3_server: LocalS3, bucket: str) -> None:
    r = cli("status", "--config", str(make_config(tmp_path, s3_server, bucket, "http://x:1")))
    assert r.returncode == 3
    assert "no state file" in r.stdout


def test_status_reads_the_state_file(tmp_path: Path, s3_server: LocalS3, bucket: str) -> None:
    cfg = make_config(tmp_path, s3_server, bucket, "http://127.0.0.1:9")
    sm = StateMachine(tmp_path / "run" / "state.json", RUN_ID)  # this test process is "the daemon"
    sm.transition(Phase.RESTORING, "boot")
    sm.transition(Phase.TRAINING, "child started")
    sm.update(
        child_pid=4242, newest_local_step=120, newest_committed_step=100, last_upload_mbps=812.5
    )
    r = cli("status", "--config", str(cfg))
    assert r.returncode == 0, r.stdout
    assert "running" in r.stdout.splitlines()[0]
    for text in ("phase:", "training", "4242", "120", "100", "812.5", "last notice:"):
        assert text in r.stdout
    r = cli("status", "--config", str(cfg), "--json")
    doc = json.loads(r.stdout)
    assert doc["phase"] == "training" and doc["child_pid"] == 4242 and doc["running"] is True
    for key in ("newest_local_step", "newest_committed_step", "last_upload_mbps", "last_notice"):
        assert key in doc
