"""The whole story on GCP and on Azure: real ``spot-supervisor run`` processes against
each cloud's metadata emulator and storage emulator, boot → notice → emergency commit →
resume on an empty disk → complete, with the final hash of an uninterrupted run.

GCP: the GCE metadata emulator (``instance/preempted``) and gcp-storage-emulator, with
the reference trainer (its hash is real). Azure: Scheduled Events (``Preempt``, approved
only after the commit) and Azurite, with the scripted trainer. (AWS:
tests/test_end_to_end.py.)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.standins.demo import SupervisorProcess, trainer_command, write_config
from daemon.standins.emulator import MetadataEmulator

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCRIPTED_TRAINER = str(REPO / "tests" / "scripted_trainer.py")
RUN_ID = "cloud-e2e"
POLL = 0.2
BUCKET = "spot-e2e"


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return env


def _config(tmp_path: Path, instance: str, remote: str, md: MetadataEmulator, command: list[str]):  # type: ignore[no-untyped-def]
    return write_config(
        tmp_path / f"{instance}.toml",
        run_id=RUN_ID,
        command=command,
        local_dir=tmp_path / instance / "checkpoints",
        remote=remote,
        endpoint_url=None,
        imds_url=md.url,
        runtime_dir=tmp_path / instance / "run",
        poll_interval=POLL,
        extra={
            "imds": {"provider": md.provider},
            "daemon": {"safety_margin": 2},
            "checkpoints": {"keep_remote": 100},  # every commit stays, to be checked
        },
    )


def _uninterrupted_hash(tmp_path: Path, command: list[str]) -> str:
    """The reference trainer run to the end without a supervisor or an interruption."""
    ckpt = tmp_path / "uninterrupted"
    r = subprocess.run(
        command,
        env={**_env({}), "SPOT_CHECKPOINT_DIR": str(ckpt), "SPOT_RUN_ID": RUN_ID},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return next(ln for ln in r.stdout.splitlines() if ln.startswith("final_params_sha256="))


def _story(
    tmp_path: Path,
    md: MetadataEmulator,
    remote: str,
    env: dict[str, str],
    command: list[str],
    notify: Any,
    clear: Any,
    *,
    wait_step: int,
    final_step: int,
) -> tuple[SupervisorProcess, SupervisorProcess, int]:
    """Boot 1 until ``wait_step`` is committed, the notice, its drain; boot 2 on an empty
    disk to the end; boot 3 stops at complete.json. Returns boots 1 and 2 and the
    interrupt step."""
    boot1 = SupervisorProcess(_config(tmp_path, "a", remote, md, command), env).start()
    restored = boot1.wait_for(lambda e: e.get("event") == "restore_finished", 60, "restore")
    assert restored["step"] is None
    boot1.wait_for(
        lambda e: e.get("event") == "checkpoint_committed" and e["step"] >= wait_step,
        60,
        f"step {wait_step} committed",
    )
    instance_deadline = notify()
    assert boot1.wait_exit(60) == 0
    assert dt.datetime.now(dt.timezone.utc) < instance_deadline, "still busy at the deadline"
    emergency = boot1.find("emergency_committed")
    assert len(emergency) == 1, boot1.lines[-30:]
    interrupt_step = int(emergency[0]["committed_step"])
    saved = [ln for ln in boot1.lines if "checkpoint_saved" in ln and "interrupt" in ln]
    assert saved or any(f"step={interrupt_step}" in ln for ln in boot1.lines)
    clear()

    boot2 = SupervisorProcess(_config(tmp_path, "b", remote, md, command), env).start()
    restored = boot2.wait_for(lambda e: e.get("event") == "restore_finished", 60, "restore")
    assert restored["step"] == interrupt_step
    assert boot2.wait_exit(120) == 0
    completed = boot2.find("run_completed")
    assert completed and completed[0]["step"] == final_step

    boot3 = SupervisorProcess(_config(tmp_path, "c", remote, md, command), env).start()
    assert boot3.wait_exit(60) == 0
    assert boot3.find("run_already_complete") and not boot3.find("child_started")
    return boot1, boot2, interrupt_step


# --- GCP ----------------------------------------------------------------------------------


@pytest.fixture
def gcs() -> Iterator[Any]:
    from daemon.standins.gcs import start_gcs_emulator

    emulator = start_gcs_emulator()
    emulator.create_bucket(BUCKET)
    yield emulator
    emulator.stop()


def _gcs_manifests(host: str, prefix: str) -> dict[int, dict[str, Any]]:
    """Every manifest in the bucket, its files checked, independently of the daemon's code."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": host}
    )
    bucket = client.bucket(BUCKET)
    manifests = {}
    for blob in client.list_blobs(BUCKET, prefix=prefix):
        if not blob.name.endswith("/manifest.json"):
            continue
        doc = json.loads(blob.download_as_bytes())
        base = blob.name[: -len("manifest.json")]
        for f in doc["files"]:
            body = bucket.blob(base + f["path"]).download_as_bytes()
            assert hashlib.sha256(body).hexdigest() == f["sha256"], f"{base}{f['path']}"
        manifests[doc["step"]] = doc
    return manifests


def test_gcp_preemption_commit_resume_complete_with_the_reference_trainer(
    tmp_path: Path, gcs: Any
) -> None:
    command = trainer_command(steps=20, save_every=5, step_seconds=0.1)
    with MetadataEmulator(provider="gcp") as md:
        env = _env(gcs.env())

        def notify() -> dt.datetime:
            md.set_preempted(True)  # GCE gives no time: the VM goes 30 s after this
            return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)

        boot1, boot2, step = _story(
            tmp_path, md, f"gs://{BUCKET}/runs", env, command, notify,
            lambda: md.set_preempted(False), wait_step=5, final_step=20,
        )  # fmt: skip
    notice = json.loads((tmp_path / "a" / "run" / "notice.json").read_text())
    assert notice["source"] == "gcp-metadata" and notice["action"] == "preempt"
    received = boot1.find("notice_received")[0]
    assert received["source_name"] == "gcp-preempted" and received["kind"] == "interruption"
    manifests = _gcs_manifests(gcs.host, f"runs/{RUN_ID}/")
    assert manifests[step]["reason"] == "interrupt" and manifests[20]["reason"] == "final"
    final = next(ln for ln in boot2.lines if ln.startswith("final_params_sha256="))
    assert final == _uninterrupted_hash(tmp_path, command)


# --- Azure --------------------------------------------------------------------------------


@pytest.fixture
def azurite() -> Iterator[Any]:
    from daemon.standins.azurite import AzuriteUnavailable, start_azurite

    try:
        server = start_azurite()
    except AzuriteUnavailable as exc:  # make install installs it: a missing one is a failure
        pytest.fail(f"{exc} (make install installs Azurite under tests/npm)")
    server.create_container(BUCKET)
    yield server
    server.stop()


def _azure_manifests(conn: str, prefix: str) -> dict[int, dict[str, Any]]:
    from azure.storage.blob import BlobServiceClient

    manifests = {}
    with BlobServiceClient.from_connection_string(conn) as svc:
        container = svc.get_container_client(BUCKET)
        for props in container.list_blobs(name_starts_with=prefix):
            if not props.name.endswith("/manifest.json"):
                continue
            doc = json.loads(container.download_blob(props.name).readall())
            base = props.name[: -len("manifest.json")]
            for f in doc["files"]:
                body = container.download_blob(base + f["path"]).readall()
                assert hashlib.sha256(body).hexdigest() == f["sha256"], f"{base}{f['path']}"
            manifests[doc["step"]] = doc
    return manifests


def test_azure_preempt_commit_approve_resume_complete(tmp_path: Path, azurite: Any) -> None:
    command = trainer_command(steps=20, save_every=5, step_seconds=0.1)
    with MetadataEmulator(provider="azure") as md:
        env = _env(azurite.env())
        events: list[dict[str, Any]] = []

        def notify() -> dt.datetime:
            when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
            events.append(md.set_azure_event("Preempt", when))
            return when

        boot1, boot2, step = _story(
            tmp_path, md, f"az://{BUCKET}/runs", env, command, notify,
            md.clear_azure_events, wait_step=5, final_step=20,
        )  # fmt: skip
        approvals = md.azure_approvals()
    notice = json.loads((tmp_path / "a" / "run" / "notice.json").read_text())
    assert notice["source"] == "azure-scheduled-events" and notice["action"] == "preempt"
    # Approved once, and only after the emergency commit.
    assert approvals == [events[0]["EventId"]]
    names = [e["event"] for e in boot1.events]
    assert names.index("emergency_committed") < names.index("azure_event_approved")
    manifests = _azure_manifests(azurite.connection_string, f"runs/{RUN_ID}/")
    assert manifests[step]["reason"] == "interrupt" and manifests[20]["reason"] == "final"
    final = next(ln for ln in boot2.lines if ln.startswith("final_params_sha256="))
    assert final == _uninterrupted_hash(tmp_path, command)
