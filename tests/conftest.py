"""Shared fixtures: a real S3 server (moto) over HTTP on loopback, buckets, configs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from daemon.standins import LocalS3, start_local_s3, use_fake_aws_credentials

# Before anything builds a boto3 client: fake credentials, and no real metadata lookups.
use_fake_aws_credentials()

REPO = Path(__file__).resolve().parent.parent


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
