"""Shared fixtures: a real S3 server (moto) over HTTP on loopback, buckets, configs."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import structlog

from daemon.standins import FAKE_AWS_ENV, LocalS3, start_local_s3, use_fake_aws_credentials
from daemon.standins.demo import SupervisorProcess, write_config
from daemon.standins.emulator import MetadataEmulator

# Before anything builds a boto3 client: fake credentials, and no real metadata lookups.
use_fake_aws_credentials()

REPO = Path(__file__).resolve().parent.parent
SCRIPTED_TRAINER = str(REPO / "tests" / "scripted_trainer.py")
SUPERVISOR_RUN_ID = "sup-run"


# structlog as the test session starts (before any fixture of any scope has run).
_STRUCTLOG_AT_START = structlog.get_config()
_STRUCTLOG_AT_START["processors"] = list(_STRUCTLOG_AT_START["processors"])


@pytest.fixture(autouse=True)
def _structlog_config_kept() -> Iterator[None]:
    """A test (or a module fixture) that runs a command in-process (``report``,
    ``check``) configures structlog for that command: put the session's first config back
    after every test, or a later test's ``capture_logs`` sees nothing."""
    yield
    structlog.configure(
        **dict(_STRUCTLOG_AT_START, processors=list(_STRUCTLOG_AT_START["processors"]))
    )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3]:
    """One moto S3 server for the whole session; tests isolate themselves by bucket."""
    server = start_local_s3()
    yield server
    server.stop()


@pytest.fixture
def s3_client(s3_server: LocalS3):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty bucket for one test."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def emulator() -> Iterator[MetadataEmulator]:
    """The IMDSv2 emulator on a free loopback port."""
    with MetadataEmulator() as md:
        yield md


@pytest.fixture
def boot(
    tmp_path: Path, s3_server: LocalS3, bucket: str, emulator: MetadataEmulator
) -> Iterator[Any]:
    """Start real supervisor processes running the scripted trainer; killed at teardown."""
    procs: list[SupervisorProcess] = []

    def start(*trainer_args: str, metrics: str | None = None, **daemon: Any) -> SupervisorProcess:
        cfg = write_config(
            tmp_path / "config.toml",
            run_id=SUPERVISOR_RUN_ID,
            command=[sys.executable, SCRIPTED_TRAINER, *trainer_args],
            local_dir=tmp_path / "ckpt",
            remote=f"s3://{bucket}/runs",
            endpoint_url=s3_server.endpoint_url,
            imds_url=emulator.url,
            runtime_dir=tmp_path / "run",
            poll_interval=0.2,
            extra={"daemon": daemon, **({"metrics": {"textfile": metrics}} if metrics else {})},
        )
        env = {**os.environ, **FAKE_AWS_ENV, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = str(REPO)
        proc = SupervisorProcess(cfg, env).start()
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


@pytest.fixture
def staging(s3_server: LocalS3, bucket: str, tmp_path: Path) -> Iterator[Any]:
    """A store on the local S3 server and the sync staging ``tmp_path/ckpt`` into it
    (tests/staging_harness.py): ``(store, sync, local_dir)``, closed after the test."""
    from staging_harness import store_and_sync

    local = tmp_path / "ckpt"
    with store_and_sync(s3_server, bucket, local) as (store, sync):
        yield store, sync, local
