"""Commits verified on any S3-compatible server, not only on one that follows AWS's ETags.

The same multipart-sized commit and restore run against moto (AWS's conventions: an
ETag is the MD5 of the bytes, or for a multipart upload the MD5 of the parts' MD5s and
``-N``) and against s3rver (tests/s3rver.py: a multipart upload's ETag is the MD5 of the
whole object). Neither verifies the additional checksum we send. A commit must go
through on both, and bytes corrupted on the way up must still be caught on both.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from s3rver import S3rverUnavailable, start_s3rver
from structlog.testing import capture_logs
from test_store import events, same_tree

from daemon.layout import CheckpointWriter, Manifest
from daemon.standins import LocalS3
from daemon.standins.faultproxy import FaultProxy
from daemon.storage.s3client import RemoteLocation, make_s3_client, make_transfer_config
from daemon.storage.store import CheckpointStore

RUN = "compat-run"
MiB = 1024 * 1024
PART = 5 * MiB  # s3.part_size_mb = 5: the smallest part S3 takes
BIG = 4 * PART + 123_457  # five parts: four whole ones and a short last one


@dataclass
class Server:
    name: str
    endpoint_url: str
    bucket: str


@pytest.fixture(params=["moto", "s3rver"])
def server(request: pytest.FixtureRequest, s3_server: LocalS3, tmp_path: Path) -> Iterator[Server]:
    """A fresh bucket on moto (the session's server) or on an s3rver of its own."""
    bucket = f"c-{uuid.uuid4().hex[:16]}"
    if request.param == "moto":
        boto3.client(
            "s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1"
        ).create_bucket(Bucket=bucket)
        yield Server("moto", s3_server.endpoint_url, bucket)
        return
    try:
        s3rver = start_s3rver(tmp_path / "s3rver", bucket)
    except S3rverUnavailable as exc:
        # Not a skip: CI must run this against s3rver, and `make test` installs it first.
        pytest.fail(str(exc))
    try:
        yield Server("s3rver", s3rver.endpoint_url, bucket)
    finally:
        s3rver.stop()


def make_store(endpoint_url: str, bucket: str) -> CheckpointStore:
    """The daemon's store with its default checksum (CRC32), 5 MiB parts."""
    client = make_s3_client(endpoint_url, "us-east-1", 8)
    config = make_transfer_config(part_size=PART, max_concurrency=4)
    return CheckpointStore(client, RemoteLocation(bucket, "runs"), RUN, config)


def make_checkpoint(local_dir: Path, step: int) -> tuple[Path, Manifest]:
    """A small file, an empty one and one of five parts."""
    with CheckpointWriter(local_dir, RUN, step, "periodic") as w:
        w.add_bytes("model.pt", os.urandom(200_000))
        w.add_bytes("empty.txt", b"")
        with w.open_file("optimizer.pt") as f:
            f.write(os.urandom(BIG))
        manifest = w.commit()
    return w.final_dir, manifest


def test_multipart_commit_and_restore_on_any_server(server: Server, tmp_path: Path) -> None:
    """Two commits with a five-part file, then a restore of the newest: same bytes.

    On s3rver the first multipart ETag that is not AWS's shape is read back and found
    right, and to be the whole object's MD5: both are said once, and from then on its
    multipart uploads predict that ETag and are checked by it, not read back."""
    store = make_store(server.endpoint_url, server.bucket)
    src10, m10 = make_checkpoint(tmp_path / "src", 10)
    src20, m20 = make_checkpoint(tmp_path / "src", 20)
    with capture_logs() as logs:
        r10 = store.upload_checkpoint(src10, m10)
        r20 = store.upload_checkpoint(src20, m20)
    assert (r10.step, r20.step) == (10, 20)
    assert r10.remote is not None and r10.remote.verified
    assert [c.step for c in store.list_committed()] == [20, 10]
    assert not events(logs, "uploaded_bytes_differ")

    differs = events(logs, "etag_convention_differs")
    checks = events(logs, "checkpoint_etags_checked")
    assert len(checks) == 2
    if server.name == "s3rver":
        (note,) = differs  # said once for the endpoint, not once per commit
        assert note["endpoint"] == server.endpoint_url
        assert note["uploads"] == "multipart" and note["method"] == "read-back"
        (learned,) = events(logs, "etag_convention_learned")
        assert learned["convention"] == "MD5 of the whole object"
        assert checks[0]["read_back"] == ["optimizer.pt"]
        assert checks[0]["checked"] == len(m10.files) - 1
        assert checks[1]["read_back"] == [] and checks[1]["checked"] == len(m10.files)
    else:
        assert differs == []
        for check in checks:
            assert check["checked"] == len(m10.files) and check["read_back"] == []

    restored = make_store(server.endpoint_url, server.bucket).restore_newest(tmp_path / "dest")
    assert restored is not None and restored.step == 20 and restored.downloaded
    same_tree(src20, restored.path)
    store.close()


def test_corruption_in_flight_is_caught_on_any_server(server: Server, tmp_path: Path) -> None:
    """A part corrupted on the way up: on either server the commit sends the file again
    and commits only bytes equal to the manifest's, whatever the server's ETags."""
    src, manifest = make_checkpoint(tmp_path / "src", 10)
    with FaultProxy(server.endpoint_url, seed=7) as proxy:
        rule = proxy.corrupt(
            "request",
            after_bytes=1000,
            method="PUT",
            path=r"optimizer\.pt\?.*partNumber=2",
            count=1,
        )
        store = make_store(proxy.url, server.bucket)
        with capture_logs() as logs:
            result = store.upload_checkpoint(src, manifest)
        store.close()
    assert rule.applied == 1 and result.step == 10
    (differ,) = events(logs, "uploaded_bytes_differ")
    assert differ["path"] == "optimizer.pt"

    direct = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1")
    (ckpt,) = make_store(server.endpoint_url, server.bucket).list_committed()
    for entry in ckpt.manifest.files:
        body = direct.get_object(Bucket=server.bucket, Key=ckpt.keys[entry.path])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry.sha256, entry.path
