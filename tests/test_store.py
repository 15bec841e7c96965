"""CheckpointStore and the S3 client helpers against moto's S3 server over real HTTP."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from botocore.compat import HAS_CRT
from structlog.testing import capture_logs

from daemon.layout import MANIFEST_NAME, CheckpointWriter, Manifest, step_dir_name
from daemon.standins import LocalS3
from daemon.storage import commit as commit_module
from daemon.storage.s3client import (
    IntegrityError,
    RemoteLocation,
    StoreError,
    checksum_algorithm,
    make_s3_client,
    make_transfer_config,
    parse_remote,
)
from daemon.storage.store import CheckpointStore

RUN = "run-1"
MiB = 1024 * 1024
# Small parts so one file of a test checkpoint goes multipart without taking long.
PART = 5 * MiB


def make_store(s3: LocalS3, bucket: str, prefix: str = "spot-runs") -> CheckpointStore:
    client = make_s3_client(s3.endpoint_url, "us-east-1", 8)
    config = make_transfer_config(part_size=PART, max_concurrency=4)
    return CheckpointStore(client, RemoteLocation(bucket, prefix), RUN, config)


def make_checkpoint(local_dir: Path, step: int, *, big: bool = False) -> tuple[Path, Manifest]:
    """A realistic checkpoint: several files, a nested one, an empty one, maybe a large one."""
    with CheckpointWriter(local_dir, RUN, step, "periodic", extra={"world_size": 1}) as w:
        w.add_bytes("model.pt", os.urandom(300_000))
        w.add_bytes("optimizer.pt", os.urandom(700_000))
        w.add_bytes("rng/rank0.bin", os.urandom(5_000))
        w.add_bytes("empty.txt", b"")
        if big:
            with w.open_file("state.bin") as f:
                for _ in range(12):  # 12 MiB: three parts up, three ranged GETs down
                    f.write(os.urandom(MiB))
        manifest = w.commit()
    return w.final_dir, manifest


def keys_under(s3_client: Any, bucket: str, prefix: str = "") -> set[str]:
    resp = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for o in resp.get("Contents", [])}


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


# -- parse_remote, client errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "bucket", "prefix"),
    [
        ("s3://my-bucket", "my-bucket", ""),
        ("s3://my-bucket/", "my-bucket", ""),
        ("s3://my-bucket/spot-runs", "my-bucket", "spot-runs"),
        ("s3://my-bucket/a/b/", "my-bucket", "a/b"),
    ],
)
def test_parse_remote(value: str, bucket: str, prefix: str) -> None:
    assert parse_remote(value) == RemoteLocation(bucket, prefix)


@pytest.mark.parametrize(
    "value",
    [
        "my-bucket/prefix",
        "s3://",
        "s3:///prefix",
        "gs://b/x",
        "s3://b",
        "s3://a b/x",
        "s3://bucket/a//b",
    ],
)
def test_parse_remote_rejects_with_the_value(value: str) -> None:
    with pytest.raises(ValueError, match="remote '"):
        parse_remote(value)


def test_missing_bucket_names_the_bucket(s3_server: LocalS3) -> None:
    store = make_store(s3_server, "no-such-bucket-here")
    with pytest.raises(StoreError, match=r"no-such-bucket-here.*does not exist") as info:
        store.list_committed()
    assert info.value.code == "NoSuchBucket"
    with pytest.raises(StoreError, match="no-such-bucket-here"):
        store.check_writable()


def test_upload_to_missing_bucket_is_a_store_error(s3_server: LocalS3, tmp_path: Path) -> None:
    ckpt, manifest = make_checkpoint(tmp_path, 1)
    with pytest.raises(StoreError, match="no-such-bucket-here"):
        make_store(s3_server, "no-such-bucket-here").upload_checkpoint(ckpt, manifest)


def test_unreachable_endpoint_is_one_clear_line() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = make_s3_client(f"http://127.0.0.1:{port}", "us-east-1", 4, max_attempts=1)
    store = CheckpointStore(client, RemoteLocation("bkt"), RUN)
    with pytest.raises(StoreError, match=f"cannot reach http://127.0.0.1:{port}") as info:
        store.read_complete()
    assert info.value.code == "Unreachable"
    assert "\n" not in str(info.value)


def test_bad_run_id_is_rejected(s3_server: LocalS3) -> None:
    client = make_s3_client(s3_server.endpoint_url, "us-east-1", 4)
    with pytest.raises(ValueError, match="run id"):
        CheckpointStore(client, RemoteLocation("bkt"), "a/b")


def test_check_writable_leaves_nothing(s3_server: LocalS3, bucket: str, s3_client: Any) -> None:
    make_store(s3_server, bucket).check_writable()
    assert keys_under(s3_client, bucket) == set()


# -- upload and listing -------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "spot-runs/team-a"])
def test_upload_then_listed_as_committed(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path, prefix: str
) -> None:
    store = make_store(s3_server, bucket, prefix)
    ckpt10, m10 = make_checkpoint(tmp_path, 10, big=True)
    ckpt20, m20 = make_checkpoint(tmp_path, 20)
    with capture_logs() as logs:
        r10 = store.upload_checkpoint(ckpt10, m10)
        store.upload_checkpoint(ckpt20, m20)
    assert (r10.step, r10.bytes, r10.already_committed) == (10, m10.total_bytes, False)
    assert r10.seconds > 0 and r10.mbps > 0
    assert [e["step"] for e in events(logs, "checkpoint_committed")] == [10, 20]

    base = f"{prefix}/{RUN}" if prefix else RUN
    step_prefix = f"{base}/checkpoints/{step_dir_name(10)}/"
    assert keys_under(s3_client, bucket, step_prefix) == {
        step_prefix + p
        for p in [
            "model.pt",
            "optimizer.pt",
            "rng/rank0.bin",
            "empty.txt",
            "state.bin",
            MANIFEST_NAME,
        ]
    }
    head = s3_client.head_object(Bucket=bucket, Key=step_prefix + "state.bin")
    assert head["ETag"].endswith('-3"')  # went up as a three-part multipart upload
    assert head["Metadata"]["sha256"] == next(f.sha256 for f in m10.files if f.path == "state.bin")
    remote_manifest = s3_client.get_object(Bucket=bucket, Key=step_prefix + MANIFEST_NAME)
    assert remote_manifest["Body"].read() == (ckpt10 / MANIFEST_NAME).read_bytes()

    committed = store.list_committed()
    assert [c.step for c in committed] == [20, 10]
    assert committed[1].manifest == m10
    assert committed[1].keys["rng/rank0.bin"] == step_prefix + "rng/rank0.bin"
    assert store.newest_committed_step() == 20


def test_reupload_of_committed_step_is_a_noop(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    store = make_store(s3_server, bucket)
    ckpt, manifest = make_checkpoint(tmp_path, 5)
    store.upload_checkpoint(ckpt, manifest)
    with capture_logs() as logs:
        again = store.upload_checkpoint(ckpt, manifest)
    assert again.already_committed and again.bytes == 0
    assert events(logs, "checkpoint_already_committed")
    assert not events(logs, "checkpoint_uploaded")


@pytest.mark.parametrize("damage", ["rewritten", "deleted"])
@pytest.mark.parametrize("victim", ["optimizer.pt", "state.bin"])  # one request; parts
def test_local_file_not_matching_manifest_commits_nothing(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path, damage: str, victim: str
) -> None:
    store = make_store(s3_server, bucket)
    ckpt, manifest = make_checkpoint(tmp_path, 7, big=True)
    path = ckpt / victim
    name = re.escape(victim)
    if damage == "rewritten":  # same size, other bytes: only a hash can tell
        path.write_bytes(os.urandom(path.stat().st_size))
        with pytest.raises(IntegrityError, match=rf"{name}.*manifest not written"):
            store.upload_checkpoint(ckpt, manifest)
    else:  # e.g. pruned by the trainer mid-upload: the sync takes this as "gone"
        path.unlink()
        with pytest.raises(FileNotFoundError, match=rf"manifest not written.*{name}"):
            store.upload_checkpoint(ckpt, manifest)
    assert not any(k.endswith(MANIFEST_NAME) for k in keys_under(s3_client, bucket))
    assert store.list_committed() == []
    # Checked while it is sent: its object may have come to be, uncommitted (a leftover
    # that retention sweeps), but no multipart upload is left open.
    assert not s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_file_changed_after_its_upload_started_commits_nothing(
    s3_server: LocalS3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files are hashed while they are sent. One whose upload read other bytes than the
    # manifest's, and which was then rewritten to the manifest's before its hash read it,
    # hashes right: only its changed identity (taken before the upload read a byte) shows
    # that what was sent is not what was hashed. Where ETags go unchecked (the CRT's
    # multipart uploads) nothing else would.
    store = make_store(s3_server, bucket)
    ckpt, manifest = make_checkpoint(tmp_path, 8, big=True)
    victim = ckpt / "optimizer.pt"
    good = victim.read_bytes()
    victim.write_bytes(os.urandom(len(good)))
    sent = threading.Event()
    verify = commit_module._verify_local
    start = store.start_upload

    def verify_once_sent(*args: Any) -> tuple[int, int, int]:
        assert sent.wait(30)
        return verify(*args)

    def start_then_rewrite(path: Path, key: str, sha256: str | None) -> Any:
        future = start(path, key, sha256)
        if path == victim:
            future.result()  # the other bytes are on the server
            victim.write_bytes(good)
            st = victim.stat()
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            sent.set()
        return future

    monkeypatch.setattr(commit_module, "_verify_local", verify_once_sent)
    monkeypatch.setattr(store, "start_upload", start_then_rewrite)
    with pytest.raises(IntegrityError, match=r"optimizer\.pt changed while it was uploaded"):
        store.upload_checkpoint(ckpt, manifest)
    assert store.list_committed() == []


@pytest.mark.parametrize("damage", ["missing", "wrong_size"])
def test_manifest_without_its_files_is_not_committed(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path, damage: str
) -> None:
    store = make_store(s3_server, bucket)
    ckpt, manifest = make_checkpoint(tmp_path, 3)
    store.upload_checkpoint(ckpt, manifest)
    key = store.file_key(3, "model.pt")
    if damage == "missing":
        s3_client.delete_object(Bucket=bucket, Key=key)
    else:
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"short")
    with capture_logs() as logs:
        assert store.list_committed() == []
    (ignored,) = events(logs, "remote_checkpoint_ignored")
    assert ignored["step"] == 3 and ignored["log_level"] == "warning"

    # Uploading the step again repairs it rather than calling it already committed.
    result = store.upload_checkpoint(ckpt, manifest)
    assert not result.already_committed
    assert [c.step for c in store.list_committed()] == [3]


def test_files_without_manifest_are_not_committed(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    store = make_store(s3_server, bucket)
    ckpt, manifest = make_checkpoint(tmp_path, 4)
    store.upload_checkpoint(ckpt, manifest)
    s3_client.delete_object(Bucket=bucket, Key=store.file_key(4, MANIFEST_NAME))
    with capture_logs() as logs:
        assert store.list_committed() == []
    assert events(logs, "remote_checkpoint_ignored")[0]["reason"] == "no manifest"


def test_delete_checkpoint_removes_everything(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    store = make_store(s3_server, bucket)
    for step in (1, 2):
        store.upload_checkpoint(*make_checkpoint(tmp_path, step))
    store.delete_checkpoint(1)
    assert [c.step for c in store.list_committed()] == [2]
    assert keys_under(s3_client, bucket, store.step_prefix(1)) == set()


def test_complete_json_roundtrip(s3_server: LocalS3, bucket: str, s3_client: Any) -> None:
    store = make_store(s3_server, bucket, "")
    assert store.read_complete() is None
    store.write_complete(1200)
    doc = store.read_complete()
    assert doc is not None and doc["step"] == 1200
    assert doc["completed_at"].endswith("Z")
    raw = s3_client.get_object(Bucket=bucket, Key=f"{RUN}/complete.json")["Body"].read()
    assert json.loads(raw) == doc


def test_malformed_complete_json_without_checkpoints_is_not_complete(
    s3_server: LocalS3, bucket: str, s3_client: Any
) -> None:
    """Decided by the checkpoints (none here: not complete), with a warning naming it;
    tests/test_hostile_bucket.py has the other cases."""
    store = make_store(s3_server, bucket)
    s3_client.put_object(Bucket=bucket, Key=store.complete_key, Body=b"{not json")
    with capture_logs() as logs:
        assert store.read_complete() is None
    (warned,) = events(logs, "complete_marker_invalid")
    assert warned["key"] == store.complete_key and "not JSON" in warned["reason"]


def test_retention_waits_for_a_verified_newer_commit(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A pending commit (staged, not yet sha256-checked) never lets an older one go."""
    store = make_store(s3_server, bucket)
    store.upload_checkpoint(*make_checkpoint(tmp_path / "src", 1))
    newer = store.upload_checkpoint(*make_checkpoint(tmp_path / "src", 2)).remote
    assert newer is not None and newer.verified
    # Mark step 2 pending, as an emergency commit of staged files is.
    store._put_bytes(
        newer.manifest_key,
        newer.manifest_raw,
        content_type="application/json",
        metadata={"verified": "pending"},
    )
    pending = store.list_committed()[0]
    assert (pending.step, pending.verified) == (2, False)
    assert store.apply_retention(1) == []
    assert [c.step for c in store.list_committed()] == [2, 1]
    assert store.mark_verified(pending).verified
    assert store.apply_retention(1) == [1]


@pytest.mark.parametrize("algorithm", ["CRC32", "SHA256", None])
def test_checksum_algorithm_choices_upload_and_verify(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path, algorithm: str | None
) -> None:
    client = make_s3_client(
        s3_server.endpoint_url, "us-east-1", 8, request_checksums=bool(algorithm)
    )
    store = CheckpointStore(
        client,
        RemoteLocation(bucket, "p"),
        RUN,
        make_transfer_config(part_size=PART, max_concurrency=4),
        checksum_algorithm=algorithm,
    )
    src, manifest = make_checkpoint(tmp_path / "src", 1, big=True)
    store.upload_checkpoint(src, manifest)
    head = s3_client.head_object(
        Bucket=bucket, Key=store.file_key(1, "model.pt"), ChecksumMode="ENABLED"
    )
    checksums = {k for k in head if k.startswith("Checksum") and k != "ChecksumType"}
    assert checksums == ({f"Checksum{algorithm}"} if algorithm else set())
    result = store.restore_newest(tmp_path / "dest")
    assert result is not None and result.step == 1
    same_tree(src, result.path)


def test_checksum_algorithm_names() -> None:
    assert checksum_algorithm("CRC32") == "CRC32"
    assert checksum_algorithm("none") is None
    with pytest.raises(ValueError, match="'MD5' is not one of"):
        checksum_algorithm("MD5")
    if not HAS_CRT:
        with pytest.raises(ValueError, match="CRC32C needs awscrt"):
            checksum_algorithm("CRC32C")


@pytest.mark.parametrize("size", [0, 1, PART - 1, PART, 3 * PART + 7])
def test_etag_digest_matches_the_server(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path, size: int
) -> None:
    """The expected ETag (s3transfer's part boundaries) is the one moto computes, fed
    in order or by offset with re-reads (as botocore's checksum pass and retries do)."""
    store = make_store(s3_server, bucket)
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    in_order = store.etag_digest(size)
    for i in range(0, size, 1_000_003):
        in_order.update(data[i : i + 1_000_003])
    by_offset = store.etag_digest(size)
    for start in reversed(range(0, max(size, 1), PART)):
        part = data[start : start + PART]
        by_offset.feed(start, part[: len(part) // 2])
        by_offset.feed(start, part)  # read again from the start of the part
        by_offset.feed(start + len(part) // 2, part[len(part) // 2 :])
    fut = store.start_upload(path, "k", None)
    store.wait_upload(fut, "k")
    etag = s3_client.head_object(Bucket=bucket, Key="k")["ETag"].strip('"')
    assert in_order.etag() == by_offset.etag() == etag
    assert ("-" in etag) == (size >= PART)
    store.close()
