"""The tail uploader against moto's S3 server over HTTP: a ``.partial`` file is uploaded
part by part while it is written, completed when renamed into place, aborted when it is
abandoned, and a file whose bytes are not the ones sent is never committed as sent."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from staging_harness import StepWriter, open_uploads, store_and_sync, syncing
from structlog.testing import capture_logs
from test_store import PART, RUN, events

from daemon import layout
from daemon.standins import LocalS3
from daemon.standins.faultproxy import FaultProxy
from daemon.storage import tail as tail_module
from daemon.storage.s3client import RemoteLocation, make_s3_client, make_transfer_config
from daemon.storage.store import CheckpointStore
from daemon.storage.tail import PartSlots, TailUpload


def until(cond: Callable[[], Any], timeout: float = 15.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"not true within {timeout} s")


class GrowingWriter(StepWriter):
    """One checkpoint written as CONTRACT §4 says, a file growing a piece at a time."""

    def __init__(self, local_dir: Path, step: int) -> None:
        super().__init__(local_dir, step)
        self._open: dict[str, BinaryIO] = {}

    def partial(self, name: str) -> Path:
        return self.tmp / (name + layout.PARTIAL_SUFFIX)

    def append(self, name: str, data: bytes) -> None:
        f = self._open.get(name)
        if f is None:
            f = self._open[name] = open(self.partial(name), "wb")  # noqa: SIM115
        f.write(data)
        f.flush()  # on disk (page cache) for the reader, as torch.save's writes are
        self.files[name] = self.files.get(name, b"") + data

    def rename(self, name: str) -> None:
        f = self._open.pop(name)
        os.fsync(f.fileno())
        f.close()
        os.rename(self.partial(name), self.tmp / name)


def uploaded_parts(s3_client: Any, bucket: str, key: str) -> list[int]:
    """Sizes of the parts of the open multipart upload of ``key`` ([] when none)."""
    ups = [u for u in s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    ups = [u for u in ups if u["Key"] == key]
    if not ups:
        return []
    resp = s3_client.list_parts(Bucket=bucket, Key=key, UploadId=ups[0]["UploadId"])
    return [p["Size"] for p in resp.get("Parts", [])]


def body(s3_client: Any, bucket: str, key: str) -> bytes:
    data: bytes = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


def two_parts_sent(
    staging: Any, s3_client: Any, bucket: str, step: int
) -> tuple[GrowingWriter, str]:
    """``model.pt`` of step ``step``, two parts written and still growing, followed until
    both parts are uploaded: its writer and its key."""
    store, sync, local = staging
    key = store.file_key(step, "model.pt")
    w = GrowingWriter(local, step)
    w.append("model.pt", os.urandom(2 * PART))
    sync.stager.scan()
    until(lambda: uploaded_parts(s3_client, bucket, key) == [PART, PART])
    return w, key


def test_a_growing_file_is_uploaded_as_it_grows_and_completed_on_rename(
    staging: Any, s3_client: Any, bucket: str
) -> None:
    store, sync, local = staging
    key = store.file_key(4, "model.pt")
    w = GrowingWriter(local, 4)
    w.append("model.pt", os.urandom(PART // 2))
    sync.stager.scan()  # starts following model.pt.partial
    time.sleep(0.2)
    assert uploaded_parts(s3_client, bucket, key) == []  # less than one part: nothing yet
    w.append("model.pt", os.urandom(PART))
    until(lambda: uploaded_parts(s3_client, bucket, key) == [PART])
    w.append("model.pt", os.urandom(PART + 123))
    until(lambda: uploaded_parts(s3_client, bucket, key) == [PART, PART])
    # Still being written: no object under the key yet, only parts of an open upload.
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket, Prefix=key)
    with capture_logs() as logs:  # the tails complete on their own once they see the rename
        w.rename("model.pt")
        w.append("small.bin", os.urandom(1000))  # never a whole part: one PutObject at the end
        sync.stager.scan()
        w.rename("small.bin")
        final = w.finish()
        assert sync.flush() == 4
    completed = {e["key"]: e for e in events(logs, "tail_upload_completed")}
    assert completed[key]["parts"] == 3 and completed[key]["sent_while_writing"] == 2 * PART
    assert completed[store.file_key(4, "small.bin")]["parts"] == 0
    (committed,) = events(logs, "checkpoint_committed")
    assert (
        committed["bytes_sent"] == 0
        and committed["bytes_staged"] == len(w.files["model.pt"]) + 1000
    )
    # Our sha256 of the bytes sent was checked against the manifest: verified at once.
    assert committed["verified"] is True
    assert body(s3_client, bucket, key) == (final / "model.pt").read_bytes()
    assert open_uploads(s3_client, bucket) == []


def test_a_file_abandoned_by_its_writer_is_aborted(
    staging: Any, s3_client: Any, bucket: str
) -> None:
    w, key = two_parts_sent(staging, s3_client, bucket, 5)
    with capture_logs() as logs:
        # The writer failed and cleaned up its temporary directory (CheckpointWriter does).
        w._open.pop("model.pt").close()
        os.remove(w.partial("model.pt"))
        until(lambda: events(logs, "tail_upload_aborted"))
    assert open_uploads(s3_client, bucket) == []
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket, Prefix=key)


def test_a_writer_killed_mid_file_is_abandoned_by_the_flush(
    staging: Any, s3_client: Any, bucket: str
) -> None:
    store, sync, local = staging
    w = GrowingWriter(local, 6)
    w.append("model.pt", os.urandom(3 * PART))  # and then the writer is gone
    sync.stager.scan()
    until(lambda: len(uploaded_parts(s3_client, bucket, store.file_key(6, "model.pt"))) == 3)
    with capture_logs() as logs:
        assert sync.flush() is None  # the child exited: nothing complete to commit
    assert events(logs, "tail_upload_aborted")
    assert [e["step"] for e in events(logs, "staging_abandoned")] == [6]
    assert open_uploads(s3_client, bucket) == []
    assert store.list_committed() == []


def test_bytes_rewritten_after_they_were_sent_are_caught_and_sent_again(
    staging: Any, s3_client: Any, bucket: str
) -> None:
    _store, sync, _local = staging
    w, key = two_parts_sent(staging, s3_client, bucket, 7)
    # A writer breaking append-only: it patches the first bytes, already sent, in place.
    f = w._open["model.pt"]
    f.seek(0)
    f.write(b"patched header")
    f.seek(0, os.SEEK_END)
    w.rename("model.pt")
    final = w.finish({"model.pt": w.partial("model.pt").with_name("model.pt").read_bytes()})
    with capture_logs() as logs:
        assert sync.flush() == 7
    (resent,) = events(logs, "staged_file_resent")
    assert resent["path"] == "model.pt" and "sha256 differs" in resent["reason"]
    (committed,) = events(logs, "checkpoint_committed")
    assert committed["bytes_sent"] == 2 * PART and committed["bytes_staged"] == 0
    stored = body(s3_client, bucket, key)
    assert stored.startswith(b"patched header") and stored == (final / "model.pt").read_bytes()


def test_a_file_changed_after_its_rename_is_sent_again(
    staging: Any, s3_client: Any, bucket: str
) -> None:
    store, sync, local = staging
    w = GrowingWriter(local, 8)
    w.append("model.pt", os.urandom(PART + 10))
    sync.stager.scan()
    w.rename("model.pt")
    until(lambda: sync.stager._dirs[8].files["model.pt"].tail.done)
    # CONTRACT §4 broken: the finished file changes under its final name.
    with open(w.tmp / "model.pt", "r+b") as f:
        f.write(b"X")
    final = w.finish({"model.pt": (w.tmp / "model.pt").read_bytes()})
    with capture_logs() as logs:
        assert sync.flush() == 8
    (resent,) = events(logs, "staged_file_resent")
    assert "changed" in resent["reason"]
    assert (
        body(s3_client, bucket, store.file_key(8, "model.pt")) == (final / "model.pt").read_bytes()
    )


def test_a_part_corrupted_on_the_wire_is_caught_before_the_commit(
    s3_server: LocalS3, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    # moto keeps whatever arrives: the corruption is caught by the ETag our MD5s predict.
    with FaultProxy(s3_server.endpoint_url) as proxy:
        local = tmp_path / "ckpt"
        with store_and_sync(LocalS3(proxy.url, None), bucket, local) as (store, sync):
            proxy.corrupt(phase="request", method="PUT", path=r"partNumber=2", count=1)
            w = GrowingWriter(local, 9)
            w.append("model.pt", os.urandom(PART))
            sync.stager.scan()
            w.append("model.pt", os.urandom(PART + 5))
            w.rename("model.pt")
            final = w.finish()
            with capture_logs() as logs:
                assert sync.flush() == 9
            assert events(logs, "uploaded_bytes_differ")[0]["path"] == "model.pt"
            key = store.file_key(9, "model.pt")
            assert body(s3_client, bucket, key) == (final / "model.pt").read_bytes()


def commit_through_a_lost_complete(
    proxy: FaultProxy, bucket: str, local: Path, step: int
) -> tuple[str, Path, list[Any]]:
    """One file of step ``step`` followed and committed through ``proxy`` while its
    CompleteMultipartUpload outlasts the client's read timeout, its own longer one
    included (one attempt only, so the timeout itself is what the tail sees): its key,
    the checkpoint, the logs."""
    client = make_s3_client(
        proxy.url, "us-east-1", 8, read_timeout=1.0, complete_read_timeout=1.0, max_attempts=1
    )
    config = make_transfer_config(part_size=PART, max_concurrency=4)
    store = CheckpointStore(client, RemoteLocation(bucket, "runs"), RUN, config)
    store.check_writable()  # the preflight: whether the server verifies checksums
    with syncing(store, local) as sync:
        proxy.stall(2.0, method="POST", path=r"uploadId=", count=1)
        w = GrowingWriter(local, step)
        w.append("model.pt", os.urandom(2 * PART + 99))
        sync.stager.scan()
        with capture_logs() as logs:
            w.rename("model.pt")
            final = w.finish()
            assert sync.flush() == step
    return store.file_key(step, "model.pt"), final, logs


def test_a_complete_that_outlasts_the_read_timeout_is_found_done(
    s3_server: LocalS3, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    # Completing a large object can take longer than the client waits (and a retry can
    # then find the upload gone): the server did complete it, and the object settles it.
    with FaultProxy(s3_server.endpoint_url) as proxy:
        key, final, logs = commit_through_a_lost_complete(proxy, bucket, tmp_path / "ckpt", 10)
    assert events(logs, "tail_upload_completed_on_retry")
    assert not events(logs, "staged_file_resent")
    (committed,) = events(logs, "checkpoint_committed")
    assert committed["bytes_sent"] == 0
    assert body(s3_client, bucket, key) == (final / "model.pt").read_bytes()


def test_parts_through_one_pooled_buffer_each_send_their_own_bytes(
    s3_server: LocalS3, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """One slot, so every full part is read into the same buffer the part before it was
    sent from: the object is still the file, byte for byte, and the buffer is kept for
    the next part until the pool is cleared."""
    client = make_s3_client(s3_server.endpoint_url, "us-east-1", 4)
    store = CheckpointStore(
        client, RemoteLocation(bucket, "runs"), RUN, make_transfer_config(PART, 4)
    )
    slots = PartSlots(1)
    data = os.urandom(3 * PART + 777)  # three full parts through the pool, one short one
    partial, final = tmp_path / "a.bin.partial", tmp_path / "a.bin"
    partial.write_bytes(data)
    with ThreadPoolExecutor(max_workers=2) as pool:
        tail = TailUpload(
            store, "runs/k/a.bin", partial, lambda: final, part_size=PART, pool=pool, slots=slots
        )
        os.rename(partial, final)
        got = tail.start().result(60)
    assert got.parts == 4 and got.size == len(data)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert body(s3_client, bucket, "runs/k/a.bin") == data
    assert slots.kept == 1  # the one full-part buffer, back in the pool
    slots.clear()
    assert slots.kept == 0


class _NoMd5:
    """hashlib for daemon.storage.tail without MD5: any MD5 the tail computes fails it."""

    sha256 = staticmethod(hashlib.sha256)

    @staticmethod
    def md5(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the tail computed an MD5 behind a server that verifies checksums")


def test_behind_a_server_that_verifies_checksums_the_tail_computes_no_md5(
    s3_server: LocalS3, s3_client: Any, bucket: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """The preflight's probe finds that the proxy refuses a wrong checksum (moto alone
    does not); the tail then computes no MD5 and commits by the ETag the server answered;
    a part flipped on the wire is refused (BadDigest) and its file sent again."""
    bare = make_s3_client(s3_server.endpoint_url, "us-east-1", 4)
    on_moto = CheckpointStore(bare, RemoteLocation(bucket, "runs"), RUN, make_transfer_config())
    assert on_moto.probe_checksum_verification() is False  # moto stores the probe...
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket)  # ...which is deleted
    monkeypatch.setattr(tail_module, "hashlib", _NoMd5)
    with FaultProxy(s3_server.endpoint_url, verify_checksums=True) as proxy:
        local = tmp_path / "ckpt"
        with store_and_sync(LocalS3(proxy.url, None), bucket, local) as (store, sync):
            with capture_logs() as logs:
                store.check_writable()
            (learned,) = events(logs, "endpoint_checksums_learned")
            assert learned["verifies_checksums"] is True and store.server_verifies_checksums
            assert proxy.stats().checksum_rejected == 1  # the probe
            proxy.corrupt(phase="request", method="PUT", path=r"partNumber=2", count=1)
            w = GrowingWriter(local, 11)
            w.append("model.pt", os.urandom(PART))
            w.append("optim.pt", os.urandom(2 * PART + 7))
            sync.stager.scan()
            w.append("model.pt", os.urandom(PART + 5))
            w.rename("model.pt")
            w.rename("optim.pt")
            final = w.finish()
            with capture_logs() as logs:
                assert sync.flush() == 11
            assert proxy.stats().checksum_rejected == 2  # the probe and the flipped part
            failed = {e["path"] for e in events(logs, "staged_file_resent")}
            (checked,) = events(logs, "checkpoint_etags_checked")
            # One of the two files had its part 2 flipped (the first to send one): that
            # file was sent again, the other committed by the ETag the server answered.
            assert len(failed) == 1 and checked["server_verified"] == 1
            for name in ("model.pt", "optim.pt"):
                key = store.file_key(11, name)
                assert body(s3_client, bucket, key) == (final / name).read_bytes()
    assert open_uploads(s3_client, bucket) == []


def test_an_object_replaced_after_a_verified_upload_is_sent_again(
    s3_server: LocalS3, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """The ETag a checksum-verifying server answered names the object our upload made;
    listed with another (someone wrote the key since, same size), it is sent again."""
    with FaultProxy(s3_server.endpoint_url, verify_checksums=True) as proxy:
        local = tmp_path / "ckpt"
        with store_and_sync(LocalS3(proxy.url, None), bucket, local) as (store, sync):
            store.check_writable()
            key = store.file_key(12, "model.pt")
            w = GrowingWriter(local, 12)
            w.append("model.pt", os.urandom(2 * PART + 3))
            with capture_logs() as logs:
                sync.stager.scan()
                w.rename("model.pt")
                until(lambda: events(logs, "tail_upload_completed"))
            s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(2 * PART + 3))
            final = w.finish()
            with capture_logs() as logs:
                assert sync.flush() == 12
            (differ,) = events(logs, "uploaded_bytes_differ")
            assert differ["path"] == "model.pt"
            assert body(s3_client, bucket, key) == (final / "model.pt").read_bytes()


def test_a_verified_complete_whose_answer_is_lost_is_read_back_not_sent_again(
    s3_server: LocalS3, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """No MD5 was kept behind a checksum-verifying server: when CompleteMultipartUpload's
    answer is lost (it outlasted the read timeout), the object is read back and its
    sha256 settles it, and the file is not sent again."""
    with FaultProxy(s3_server.endpoint_url, verify_checksums=True) as proxy:
        key, final, logs = commit_through_a_lost_complete(proxy, bucket, tmp_path / "ckpt", 13)
    assert events(logs, "tail_upload_completed_on_retry")
    assert [e["key"] for e in events(logs, "tail_upload_read_back")] == [key]
    assert not events(logs, "staged_file_resent")
    (checked,) = events(logs, "checkpoint_etags_checked")
    assert checked["server_verified"] == 1
    (committed,) = events(logs, "checkpoint_committed")
    assert committed["bytes_sent"] == 0
    assert body(s3_client, bucket, key) == (final / "model.pt").read_bytes()
