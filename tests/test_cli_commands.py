"""The one-shot subcommands as a user runs them: check, sync, restore, status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon import layout
from daemon.standins import FAKE_AWS_ENV, LocalS3
from daemon.standins.demo import write_config
from daemon.standins.emulator import MetadataEmulator
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
        "ok   notice budget",
    ]
    assert "no notice pending" in r.stdout


def test_check_runs_every_check_after_a_failure_then_exits_1(
    tmp_path: Path, s3_server: LocalS3, bucket: str
) -> None:
    cfg = make_config(tmp_path, s3_server, bucket, "http://127.0.0.1:9")
    r = cli("check", "--config", str(cfg))
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == [
        "ok   config",
        "ok   local dir",
        "ok   command",
        "FAIL metadata",
        "ok   bucket",  # checked although the metadata service failed before it
        "ok   notice budget",
    ]
    assert "127.0.0.1:9" in lines[3] and "refused" in lines[3]


def test_check_reports_every_failure(tmp_path: Path, s3_server: LocalS3) -> None:
    cfg = make_config(tmp_path, s3_server, "no-such-bkt", "http://127.0.0.1:9")
    text = cfg.read_text().replace(f'"{sys.executable}"', '"no-such-program-7f3a"')
    cfg.write_text(text)
    r = cli("check", "--config", str(cfg))
    assert r.returncode == 1
    failed = [ln.split(":")[0] for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
    assert failed == ["FAIL command", "FAIL metadata", "FAIL bucket"]


def test_check_with_a_metadata_url_the_client_cannot_speak_exits_2(
    tmp_path: Path, s3_server: LocalS3, bucket: str
) -> None:
    # Once a traceback from the metadata check (exit 1); now the config names the key.
    cfg = make_config(tmp_path, s3_server, bucket, "https://169.254.169.254")
    r = cli("check", "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "FAIL config: imds.url: 'https://169.254.169.254' is not http://host[:port]:"
        " the client speaks plain http only"
    ]


def test_check_with_an_unknown_run_user_exits_2(
    tmp_path: Path, s3_server: LocalS3, bucket: str, emulator: MetadataEmulator
) -> None:
    cfg = make_config(tmp_path, s3_server, bucket, emulator.url)
    cfg.write_text(cfg.read_text().replace("[run]\n", '[run]\nuser = "no-such-user-7f3a"\n'))
    r = cli("check", "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.startswith("FAIL config: run.user: no user 'no-such-user-7f3a'")


def test_check_names_the_user_the_command_runs_as(
    tmp_path: Path, s3_server: LocalS3, bucket: str, emulator: MetadataEmulator
) -> None:
    if os.geteuid() != 0:
        pytest.skip("run.user needs root")
    cfg = make_config(tmp_path, s3_server, bucket, emulator.url)
    cfg.write_text(cfg.read_text().replace("[run]\n", '[run]\nuser = "nobody"\n'))
    r = cli("check", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    command = [ln for ln in r.stdout.splitlines() if ln.startswith("ok   command")]
    assert command and "runs as nobody (uid 65534" in command[0]


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


def test_the_daemon_process_runs_without_rich_and_logs_errors_plainly() -> None:
    """structlog would import ``rich`` (4 MB) wherever some other package installed it;
    the daemon's own process hides it, and an exception is still logged in full."""
    probe = (
        "import sys, daemon.cli as c; c._without_rich(); import structlog, daemon.log as l;"
        "l.configure('info', sys.stdout);"
        "log = structlog.get_logger('probe')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('boom')\n"
        "print('rich loaded:', sys.modules.get('rich') is not None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "rich loaded: False" in out
    assert "ZeroDivisionError" in out
    # A process that imported structlog before (a test, an embedding tool) keeps its rich.
    from daemon.cli import _without_rich

    before = sys.modules.get("rich", "absent")
    _without_rich()
    assert sys.modules.get("rich", "absent") == before
