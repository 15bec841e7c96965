"""The whole story, end to end: real supervisor processes, the real reference trainer,
moto's S3 server over HTTP and the metadata emulator over HTTP, all on loopback."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.standins import FAKE_AWS_ENV, LocalS3
from daemon.standins.demo import SupervisorProcess, trainer_command, write_config
from daemon.standins.emulator import MetadataEmulator

pytestmark = pytest.mark.slow

RUN_ID = "e2e-run"
POLL = 0.5


def committed_manifests(s3_client: Any, bucket: str, prefix: str) -> dict[int, dict[str, Any]]:
    """Every manifest in the bucket, checked independently of the daemon's code."""
    objects: dict[str, dict[str, Any]] = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            objects[obj["Key"]] = obj
    manifests = {}
    for key in objects:
        if not key.endswith("/manifest.json"):
            continue
        doc = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
        base = key[: -len("manifest.json")]
        assert base.endswith(f"step-{doc['step']:09d}/")
        for f in doc["files"]:
            body = s3_client.get_object(Bucket=bucket, Key=base + f["path"])["Body"].read()
            assert len(body) == f["size"], f"{base}{f['path']} size differs from the manifest"
            assert hashlib.sha256(body).hexdigest() == f["sha256"], f"{base}{f['path']} sha256"
        manifests[doc["step"]] = doc
    return manifests


def test_boot_train_notice_restore_resume_complete(
    tmp_path: Path, s3_server: LocalS3, s3_client: Any, bucket: str, emulator: MetadataEmulator
) -> None:
    env = {**os.environ, **FAKE_AWS_ENV, "PYTHONUNBUFFERED": "1"}

    def config_for(instance: str) -> Path:
        return write_config(
            tmp_path / f"{instance}.toml",
            run_id=RUN_ID,
            command=trainer_command(steps=40, save_every=5, step_seconds=0.1),
            local_dir=tmp_path / instance / "checkpoints",
            remote=f"s3://{bucket}/runs",
            endpoint_url=s3_server.endpoint_url,
            imds_url=emulator.url,
            runtime_dir=tmp_path / instance / "run",
            poll_interval=POLL,
        )

    # 1. Boot on an empty bucket: nothing restored, the child gets the contract's environment.
    boot1 = SupervisorProcess(config_for("a"), env).start()
    restored = boot1.wait_for(lambda e: e.get("event") == "restore_finished", 60, "restore")
    assert restored["step"] is None
    # 2. Periodic checkpoints are committed in the background.
    boot1.wait_for(
        lambda e: e.get("event") == "checkpoint_committed" and e["step"] >= 10, 60, "step 10"
    )
    # 3. The notice: 30 s of warning.
    notice_time = emulator.set_notice(
        "terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    )
    set_at = time.monotonic()
    assert boot1.wait_exit(60) == 0
    exited_wall = dt.datetime.now(dt.timezone.utc)
    assert exited_wall < notice_time, "the supervisor was still busy at the notice's time"

    names = [e["event"] for e in boot1.events]
    draining = next(e for e in boot1.events if e.get("phase") == "draining")
    sigterm = next(
        e for e in boot1.events if e["event"] == "child_signalled" and e["signal"] == "SIGTERM"
    )
    # In order: notice received, SIGTERM sent, drain clock started.
    assert names.index("notice_received") < boot1.events.index(sigterm)
    assert boot1.events.index(sigterm) < boot1.events.index(draining)
    # Within one poll interval of the notice appearing (generous slack for a loaded machine).
    assert sigterm["_t"] - set_at < POLL + 3.0
    # The notice file the trainer reads, written before SIGTERM.
    notice_doc = json.loads((tmp_path / "a" / "run" / "notice.json").read_text())
    # `deadline` is the drain deadline (the trainer is killed then), the safety margin
    # and the upload reserve before the instance's own time.
    assert notice_doc["action"] == "terminate" and notice_doc["source"] == "aws-imds"
    assert notice_doc["instance_deadline"] == notice_time.strftime("%Y-%m-%dT%H:%M:%SZ")
    lead = dt.datetime.strptime(notice_doc["instance_deadline"], "%Y-%m-%dT%H:%M:%SZ") - (
        dt.datetime.strptime(notice_doc["deadline"], "%Y-%m-%dT%H:%M:%SZ")
    )
    want = draining["safety_margin_s"] + draining["upload_reserve_s"]
    assert abs(lead.total_seconds() - want) <= 1.0
    saved = [ln for ln in boot1.lines if ln.startswith("checkpoint_saved") and "interrupt" in ln]
    assert saved, "the trainer did not save an interrupt checkpoint"
    emergency = boot1.find("emergency_committed")
    assert len(emergency) == 1
    interrupt_step = emergency[0]["committed_step"]
    assert f"step={interrupt_step}" in saved[-1].split()

    manifests = committed_manifests(s3_client, bucket, f"runs/{RUN_ID}/")
    assert interrupt_step in manifests
    assert manifests[interrupt_step]["reason"] == "interrupt"
    assert max(manifests) == interrupt_step

    # 4. Next boot, a new instance with an empty local dir: restore that checkpoint, resume.
    emulator.clear_notice()
    boot2 = SupervisorProcess(config_for("b"), env).start()
    restored = boot2.wait_for(lambda e: e.get("event") == "restore_finished", 60, "restore")
    assert restored["step"] == interrupt_step
    resumed = boot2.wait_for_line("resumed", 60)
    assert f"step={interrupt_step}" in resumed.split()
    # 5. Completion: final checkpoint committed, complete.json written, exit 0.
    assert boot2.wait_exit(120) == 0
    completed = boot2.find("run_completed")
    assert completed and completed[0]["step"] == 40
    manifests = committed_manifests(s3_client, bucket, f"runs/{RUN_ID}/")
    assert manifests[40]["reason"] == "final"
    complete = json.loads(
        s3_client.get_object(Bucket=bucket, Key=f"runs/{RUN_ID}/complete.json")["Body"].read()
    )
    assert complete["step"] == 40 and complete["completed_at"].endswith("Z")

    # A third boot finds complete.json and does not train again.
    boot3 = SupervisorProcess(config_for("c"), env).start()
    assert boot3.wait_exit(60) == 0
    assert boot3.find("run_already_complete")
    assert not boot3.find("child_started")
    assert not (tmp_path / "c" / "checkpoints").exists() or not any(
        (tmp_path / "c" / "checkpoints").iterdir()
    )


def test_demo_command_prints_the_timeline_and_exits_0(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "daemon", "demo"],
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, **FAKE_AWS_ENV, "PYTHONPATH": str(Path(__file__).parent.parent)},
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for text in (
        "spot notice: terminate at",
        "SIGTERM to the trainer",
        "interrupt checkpoint step",
        "restored step",
        "completed at step 60",
        "final_params_sha256=",
        "complete.json found: not training again",
    ):
        assert text in r.stdout, f"{text!r} missing from the demo's timeline:\n{r.stdout}"
    # The demo ends with the run's report (issue 17): three boots, one notice.
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("report: "))
    page = Path(line.split()[1])
    assert page == tmp_path / "demo-report" / "report.html"
    report = json.loads((page.parent / "report.json").read_text())
    assert report["boots"] == 3 and report["interruptions"] == 1
    assert report["complete"] is True and report["newest_committed_step"] == 60
    boots = report["per_boot"]
    assert [b["instance_id"] for b in boots] == [
        "i-0a11ce0000000000a",
        "i-0b0b000000000000b",
        "i-0c0c000000000000c",
    ]
    # Against the demo's own story: the interrupt step it committed is the one the
    # second instance restored, and nothing was lost (the emergency commit saved it).
    interrupt = int(re.search(r"interrupt checkpoint step (\d+)", r.stdout).group(1))
    (stop,) = report["per_interruption"]
    assert stop["saved_step"] == interrupt and stop["lost_steps"] == 0
    assert boots[1]["restored_step"] == interrupt and boots[0]["notice"]["action"] == "terminate"
    assert report["cost"]["spot_usd"] > 0 and report["cost"]["on_demand_usd"] > 0
    assert 0 < report["goodput"] <= 1
    # Seen, not just written: the page loads in a real browser, picture and all.
    from chromium import load_page

    check = load_page(page.as_uri())
    assert check.problems == [], check.problems
    (img,) = check.images
    assert img["complete"] and img["width"] > 1000 and img["height"] > 300, img
