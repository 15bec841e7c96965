"""Encrypted objects: the ETag is compared with an MD5 only where it is one.

S3's ETag is the MD5 of the bytes for unencrypted and SSE-S3 (``AES256``) objects, and
not for SSE-KMS, DSSE-KMS (``aws:kms:dsse``) or SSE-C ones. AWS KMS cannot run here, so
its responses are stubbed (botocore's Stubber): the Stubber answers the calls in order
and fails on any other, which shows which path the commit took: the ETag alone, AWS's
checksum check (a HEAD, no GET), or a read-back (a GET of the object).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber
from structlog.testing import capture_logs
from test_store import events

from daemon.layout import MANIFEST_NAME, CheckpointWriter, Manifest
from daemon.storage.s3client import (
    IntegrityError,
    RemoteLocation,
    etag_is_md5,
    is_aws_endpoint,
    make_s3_client,
)
from daemon.storage.store import CheckpointStore, RemoteCheckpoint

RUN = "enc-run"
BUCKET = "enc-bucket"
KEY = f"runs/{RUN}/checkpoints/step-000000007/model.pt"
MANIFEST_KEY = f"runs/{RUN}/checkpoints/step-000000007/{MANIFEST_NAME}"
AWS = None  # no endpoint_url: AWS S3 itself
OTHER = "http://s3.example.internal:9000"  # an S3-compatible server (never contacted)
# What AWS answers for each encryption, beside the ETag.
SSE_FIELDS: dict[str, dict[str, str]] = {
    "AES256": {"ServerSideEncryption": "AES256"},
    "aws:kms": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "arn:aws:kms:k"},
    "aws:kms:dsse": {"ServerSideEncryption": "aws:kms:dsse", "SSEKMSKeyId": "arn:aws:kms:k"},
    "SSE-C": {"SSECustomerAlgorithm": "AES256", "SSECustomerKeyMD5": "a2V5bWQ1"},
}
ENCRYPTED = ["aws:kms", "aws:kms:dsse", "SSE-C"]


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def quoted(etag: str) -> str:
    return f'"{etag}"'


def not_an_md5(data: bytes) -> str:
    """The kind of ETag KMS gives: 32 hex digits, but not the bytes' MD5."""
    return hashlib.md5(b"kms:" + data, usedforsecurity=False).hexdigest()


class Checkpoint:
    """One local checkpoint of one file, and the Stubber's answers about it."""

    def __init__(self, tmp_path: Path) -> None:
        with CheckpointWriter(tmp_path / "ckpt", RUN, 7, "periodic") as w:
            w.add_bytes("model.pt", os.urandom(50_000))
            self.manifest: Manifest = w.commit()
        self.data = (w.final_dir / "model.pt").read_bytes()
        self.manifest_raw = (w.final_dir / MANIFEST_NAME).read_bytes()


@pytest.fixture
def ckpt(tmp_path: Path) -> Checkpoint:
    return Checkpoint(tmp_path)


def stubbed_store(endpoint_url: str | None) -> tuple[CheckpointStore, Stubber]:
    client = make_s3_client(endpoint_url, "us-east-1")
    return CheckpointStore(client, RemoteLocation(BUCKET, "runs"), RUN), Stubber(client)


@pytest.fixture(params=[AWS, OTHER], ids=["aws", "other"])
def stubbed(request: pytest.FixtureRequest) -> Iterator[tuple[CheckpointStore, Stubber]]:
    store, stub = stubbed_store(request.param)
    with stub:
        yield store, stub
    stub.assert_no_pending_responses()


def listing(stub: Stubber, etag: str, size: int) -> None:
    stub.add_response(
        "list_objects_v2",
        {"Contents": [{"Key": KEY, "Size": size, "ETag": quoted(etag)}], "IsTruncated": False},
        {"Bucket": BUCKET, "Prefix": ANY},
    )


def head(stub: Stubber, etag: str, size: int, fields: dict[str, str]) -> None:
    stub.add_response(
        "head_object",
        {"ETag": quoted(etag), "ContentLength": size, **fields},
        {"Bucket": BUCKET, "Key": KEY, "ChecksumMode": "ENABLED"},
    )


def read_back(stub: Stubber, key: str, body: bytes) -> None:
    stub.add_response(
        "get_object",
        {"Body": StreamingBody(io.BytesIO(body), len(body)), "ContentLength": len(body)},
        {"Bucket": BUCKET, "Key": key},
    )


def put(stub: Stubber, key: str, etag: str, fields: dict[str, str]) -> None:
    """The answer to one small PUT (a manifest, complete.json)."""
    stub.add_response(
        "put_object",
        {"ETag": quoted(etag), **fields},
        {
            "Bucket": BUCKET,
            "Key": key,
            "Body": ANY,
            "ContentType": "application/json",
            "Metadata": ANY,
            "ChecksumAlgorithm": "CRC32",
        },
    )


def commit(store: CheckpointStore, ckpt: Checkpoint, **kwargs: Any) -> RemoteCheckpoint:
    """Commit step 7, its file expected to have the ETag AWS gives its bytes."""
    expected = {"model.pt": md5(ckpt.data)}
    return store.commit_manifest(7, ckpt.manifest, ckpt.manifest_raw, expected, **kwargs)


# -- the rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "comparable"),
    [
        ({"ETag": '"0123456789abcdef0123456789abcdef"'}, True),
        ({"ETag": '"0123456789abcdef0123456789abcdef-13"'}, True),
        ({"ETag": '"0123456789abcdef0123456789abcdef"', **SSE_FIELDS["AES256"]}, True),
        ({"ETag": '"0123456789abcdef0123456789abcdef"', **SSE_FIELDS["aws:kms"]}, False),
        ({"ETag": '"0123456789abcdef0123456789abcdef"', **SSE_FIELDS["aws:kms:dsse"]}, False),
        ({"ETag": '"0123456789abcdef0123456789abcdef"', **SSE_FIELDS["SSE-C"]}, False),
        ({"ETag": '"not-an-md5"'}, False),
        ({}, False),
    ],
)
def test_which_etags_are_md5s(fields: dict[str, str], comparable: bool) -> None:
    assert etag_is_md5(fields) is comparable


def test_aws_endpoints() -> None:
    for url in (
        "https://s3.amazonaws.com",
        "https://s3.eu-west-1.amazonaws.com",
        "https://s3-fips.dualstack.us-gov-west-1.amazonaws.com",
        "https://bucket.vpce-0a1b.s3.us-east-1.vpce.amazonaws.com",
        "https://s3.cn-north-1.amazonaws.com.cn",
    ):
        assert is_aws_endpoint(url), url
    for url in ("http://127.0.0.1:9000", "https://minio.example.com", "https://amazonaws.com.evil"):
        assert not is_aws_endpoint(url), url


# -- the commit, per encryption ----------------------------------------------------------


def test_aes256_md5_etag_is_compared_and_nothing_is_read(
    stubbed: tuple[CheckpointStore, Stubber], ckpt: Checkpoint
) -> None:
    store, stub = stubbed
    listing(stub, md5(ckpt.data), len(ckpt.data))
    put(stub, MANIFEST_KEY, md5(ckpt.manifest_raw), SSE_FIELDS["AES256"])
    with capture_logs() as logs:
        remote = commit(store, ckpt)
    assert remote.verified
    (checked,) = events(logs, "checkpoint_etags_checked")
    assert checked["checked"] == 1 and checked["read_back"] == checked["server_checksum"] == []


def test_aes256_other_bytes_are_caught_and_sent_again(
    stubbed: tuple[CheckpointStore, Stubber], ckpt: Checkpoint
) -> None:
    """An SSE-S3 ETag is an MD5: one that differs is read back (bytes differ), the file
    is sent again, still differs, and nothing is committed (no put_object stubbed)."""
    store, stub = stubbed
    bad = bytes([ckpt.data[0] ^ 1]) + ckpt.data[1:]
    for _ in range(2):  # the check, and the check after sending again
        listing(stub, md5(bad), len(bad))
        head(stub, md5(bad), len(bad), SSE_FIELDS["AES256"])
        read_back(stub, KEY, bad)
    resent: list[str] = []

    def resend(path: str) -> str:
        resent.append(path)
        return md5(ckpt.data)

    with capture_logs() as logs, pytest.raises(IntegrityError, match="manifest not written"):
        commit(store, ckpt, resend=resend)
    assert resent == ["model.pt"]
    assert [e["path"] for e in events(logs, "uploaded_bytes_differ")] == ["model.pt"]
    assert not events(logs, "etag_convention_differs")  # corruption, not a convention


@pytest.mark.parametrize("sse", ENCRYPTED)
def test_encrypted_on_aws_is_verified_by_the_checksum_aws_checked(
    sse: str, ckpt: Checkpoint
) -> None:
    """AWS: a KMS/DSSE/SSE-C ETag is not compared, nothing is read back: AWS verified
    the CRC32 sent with the bytes (HEAD shows it kept one)."""
    store, stub = stubbed_store(AWS)
    checksum = {"ChecksumCRC32": "AAAAAA=="}
    listing(stub, not_an_md5(ckpt.data), len(ckpt.data))
    head(stub, not_an_md5(ckpt.data), len(ckpt.data), {**SSE_FIELDS[sse], **checksum})
    put(stub, MANIFEST_KEY, not_an_md5(ckpt.manifest_raw), {**SSE_FIELDS[sse], **checksum})
    with stub, capture_logs() as logs:
        remote = commit(store, ckpt)
    stub.assert_no_pending_responses()
    assert remote.verified
    (checked,) = events(logs, "checkpoint_etags_checked")
    assert checked["server_checksum"] == ["model.pt"] and checked["read_back"] == []
    for name in ("uploaded_bytes_differ", "object_etag_mismatch", "etag_convention_differs"):
        assert not events(logs, name), name


@pytest.mark.parametrize("endpoint", [AWS, OTHER], ids=["aws-no-checksum", "other"])
@pytest.mark.parametrize("sse", ENCRYPTED)
def test_encrypted_elsewhere_is_read_back(sse: str, endpoint: str | None, ckpt: Checkpoint) -> None:
    """Another server's checksum may be an unverified echo, and without a checksum AWS
    checked nothing: the file and the manifest are read back and hashed instead."""
    store, stub = stubbed_store(endpoint)
    checksum = {"ChecksumCRC32": "AAAAAA=="} if endpoint == OTHER else {}
    listing(stub, not_an_md5(ckpt.data), len(ckpt.data))
    head(stub, not_an_md5(ckpt.data), len(ckpt.data), {**SSE_FIELDS[sse], **checksum})
    read_back(stub, KEY, ckpt.data)
    put(stub, MANIFEST_KEY, not_an_md5(ckpt.manifest_raw), {**SSE_FIELDS[sse], **checksum})
    read_back(stub, MANIFEST_KEY, ckpt.manifest_raw)
    pending = {"model.pt"}  # a staged file not yet hashed: the read-back hashes it
    with stub, capture_logs() as logs:
        remote = commit(store, ckpt, pending=pending)
    stub.assert_no_pending_responses()
    assert remote.verified and pending == set()
    (checked,) = events(logs, "checkpoint_etags_checked")
    assert checked["read_back"] == ["model.pt"] and checked["server_checksum"] == []
    for name in ("uploaded_bytes_differ", "object_etag_mismatch", "etag_convention_differs"):
        assert not events(logs, name), name


@pytest.mark.parametrize("sse", ENCRYPTED)
def test_encrypted_other_bytes_are_still_caught(sse: str, ckpt: Checkpoint) -> None:
    """Not comparing a KMS ETag is no pass: the bytes read back differ, nothing commits."""
    store, stub = stubbed_store(OTHER)
    bad = ckpt.data[:-1] + bytes([ckpt.data[-1] ^ 1])
    listing(stub, not_an_md5(bad), len(bad))
    head(stub, not_an_md5(bad), len(bad), SSE_FIELDS[sse])
    read_back(stub, KEY, bad)
    with stub, pytest.raises(IntegrityError, match=r"model\.pt.*manifest not written"):
        commit(store, ckpt)
    stub.assert_no_pending_responses()


@pytest.mark.parametrize("sse", ENCRYPTED)
def test_complete_json_on_kms_is_not_an_etag_mismatch(sse: str) -> None:
    """A small PUT (complete.json, manifests) of a KMS object on AWS: no retry, no error."""
    store, stub = stubbed_store(AWS)
    put(
        stub,
        f"runs/{RUN}/complete.json",
        "f" * 32,
        {**SSE_FIELDS[sse], "ChecksumCRC32": "AAAAAA=="},
    )
    with stub, capture_logs() as logs:
        store.write_complete(7)
    stub.assert_no_pending_responses()
    assert not events(logs, "object_etag_mismatch")
