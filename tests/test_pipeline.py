"""The emergency pipeline against moto's S3 server over HTTP: files are staged while the
checkpoint is still being written, invisible to restore until the commit, verified
against the manifest at the commit (a mismatch is sent again), and a cancellation
commits nothing and leaves no multipart upload behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from staging_harness import StepWriter, open_uploads, store_and_sync
from staging_harness import make_store as make_store  # test_sync.py imports it from here
from structlog.testing import capture_logs
from test_store import PART, RUN, MiB, events, make_checkpoint, same_tree

from daemon import layout
from daemon.standins import LocalS3
from daemon.storage.s3client import (
    RemoteLocation,
    UploadCancelled,
    make_s3_client,
)
from daemon.storage.store import CheckpointStore


class SlowWriter(StepWriter):
    """Builds ``.tmp-step-N-*/`` the way CONTRACT §4 says, one file at a time, so a test
    can act between files: ``<name>.partial``, fsync, rename; manifest last; rename dir."""

    def write(self, name: str, data: bytes) -> None:
        final = self.tmp / name
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(final.name + layout.PARTIAL_SUFFIX)
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, final)
        self.files[name] = data


def remote_keys(s3_client: Any, bucket: str, prefix: str) -> set[str]:
    resp = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix) :] for o in resp.get("Contents", [])}


def commit_step_5(staging: Any, tmp_path: Path) -> None:
    """An older checkpoint, step 5, committed, and the sync told of it."""
    store, sync, _local = staging
    old_dir, _ = make_checkpoint(tmp_path / "old", 5)
    store.upload_checkpoint(old_dir, layout.load_complete(old_dir))
    sync.load_remote()


def test_files_staged_while_writing_are_invisible_then_committed(
    staging: Any, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    store, sync, local = staging
    # A committed older checkpoint: restore must keep choosing it until the commit.
    commit_step_5(staging, tmp_path)

    w = SlowWriter(local, 9)
    big = os.urandom(3 * PART + 12345)  # multipart-sized: four parts
    w.write("shard-0.bin", big)
    w.write("rng/rank0.bin", os.urandom(5000))
    (w.tmp / ("shard-1.bin" + layout.PARTIAL_SUFFIX)).write_bytes(b"half")  # still writing
    with capture_logs() as logs:
        assert sync.stager.scan() == 2  # the .partial is not staged
        assert sync.stager.scan() == 0  # nor anything twice
    assert {e["path"] for e in events(logs, "file_staged")} == {"shard-0.bin", "rng/rank0.bin"}

    # Staged under the final keys, yet restore sees only the older commit.
    for staged in list(sync.stager._dirs[9].files.values()):
        if staged.tail is None:  # shard-1.bin.partial is followed, nothing sent yet
            store.wait_upload(staged.transfer, staged.key)
    assert remote_keys(s3_client, bucket, store.step_prefix(9)) == {"shard-0.bin", "rng/rank0.bin"}
    assert [c.step for c in store.list_committed()] == [5]

    os.remove(w.tmp / ("shard-1.bin" + layout.PARTIAL_SUFFIX))
    w.write("shard-1.bin", os.urandom(PART // 2))
    final = w.finish()
    with capture_logs() as logs:
        assert sync.flush() == 9
    (taken,) = events(logs, "staged_files_taken")
    assert (taken["files"], taken["listed"]) == (2, 3)
    (committed,) = events(logs, "checkpoint_committed")
    assert committed["bytes_staged"] == len(big) + 5000
    assert committed["bytes_sent"] == PART // 2  # only the file staged too late

    restored = store.restore_newest(tmp_path / "dest")
    assert restored is not None and restored.step == 9 and restored.downloaded
    same_tree(final, restored.path)


def test_staged_file_not_matching_the_manifest_is_sent_again(
    staging: Any, s3_client: Any, bucket: str
) -> None:
    store, sync, local = staging
    w = SlowWriter(local, 3)
    w.write("model.pt", b"A" * 300_000)
    w.write("optim.pt", os.urandom(2 * PART))
    sync.stager.scan()
    # A writer breaking CONTRACT §4: the file under its final name is replaced.
    w.write("model.pt", b"B" * 300_000)
    w.finish()
    with capture_logs() as logs:
        assert sync.flush() == 3
    (resent,) = events(logs, "staged_file_resent")
    assert resent["path"] == "model.pt" and "changed" in resent["reason"]
    body = s3_client.get_object(Bucket=bucket, Key=store.file_key(3, "model.pt"))["Body"].read()
    assert body == b"B" * 300_000


# crt=True is the store on AWS once awscrt is installed. Its complete files go through
# the CRT client, which reads paths natively, part by part; staged files, renamed into
# place mid-upload, must still go through the classic, rename-tolerant manager. (awscrt
# is not installed here, so building the CRT manager would raise MissingDependency: the
# crt-store case also shows that staging never touches it.)
@pytest.mark.parametrize("crt", [False, True], ids=["classic", "crt-store"])
def test_rename_while_parts_are_read_does_not_break_the_upload(
    s3_server: LocalS3, bucket: str, tmp_path: Path, crt: bool
) -> None:
    # One connection, many parts: the directory is renamed while most parts are unread.
    local = tmp_path / "ckpt"
    with store_and_sync(s3_server, bucket, local, concurrency=1, crt=crt) as (store, sync):
        w = SlowWriter(local, 4)
        w.write("big.bin", os.urandom(6 * PART))
        sync.stager.scan()
        final = w.finish()
        tmp_path_str = str(w.tmp / "big.bin")
        assert sync.stager.resolve(tmp_path_str) == str(final / "big.bin")
        with capture_logs() as logs:
            assert sync.flush() == 4
        assert not events(logs, "staged_file_resent")
        (committed,) = events(logs, "checkpoint_committed")
        assert committed["bytes_staged"] == 6 * PART and committed["bytes_sent"] == 0
        # A staged file's part boundaries are known, so its multipart ETag is checked,
        # while a complete file of that size sent through CRT could not be.
        (checked,) = events(logs, "checkpoint_etags_checked")
        assert "big.bin" not in checked.get("unchecked", {}), checked
        assert store.etag_checkable(6 * PART, staged=True)
        assert store.etag_checkable(6 * PART) is not crt


def test_cancel_commits_nothing_and_aborts_multipart_uploads(
    staging: Any, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    store, sync, local = staging
    commit_step_5(staging, tmp_path)

    w = SlowWriter(local, 8)
    w.write("shard-0.bin", os.urandom(8 * PART))
    w.write("shard-1.bin", os.urandom(8 * PART))
    sync.stager.scan()
    with capture_logs() as logs:
        sync.cancel("notice deadline less the safety margin")
        w.finish()  # the writer finishes just too late
        assert sync.flush() == 5
    assert events(logs, "uploads_cancelled")
    assert events(logs, "checkpoint_upload_cancelled")[0]["step"] == 8
    # Never a partial commit: no manifest for step 8; the older commit stands.
    assert layout.MANIFEST_NAME not in remote_keys(s3_client, bucket, store.step_prefix(8))
    assert [c.step for c in store.list_committed()] == [5]
    assert open_uploads(s3_client, bucket) == []
    # And nothing can be written any more through this store.
    with pytest.raises(UploadCancelled):
        store.write_complete(8)


def test_writer_that_never_finishes_is_abandoned(staging: Any, s3_client: Any, bucket: str) -> None:
    store, sync, local = staging
    w = SlowWriter(local, 6)
    w.write("shard-0.bin", os.urandom(4 * PART))
    sync.stager.scan()
    with capture_logs() as logs:
        assert sync.flush() is None  # killed at the drain deadline: nothing to commit
    (abandoned,) = events(logs, "staging_abandoned")
    assert abandoned["step"] == 6
    assert open_uploads(s3_client, bucket) == []
    assert store.list_committed() == []


def test_boot_cleanup_aborts_leftover_multipart_uploads(
    staging: Any, s3_client: Any, bucket: str
) -> None:
    store, _sync, _local = staging
    key = store.file_key(7, "shard-0.bin")
    up = s3_client.create_multipart_upload(Bucket=bucket, Key=key)
    s3_client.upload_part(
        Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * MiB
    )
    other = s3_client.create_multipart_upload(Bucket=bucket, Key="other-run/x.bin")
    assert store.abort_incomplete_uploads() == 1
    assert open_uploads(s3_client, bucket) == ["other-run/x.bin"]  # not ours: left alone
    s3_client.abort_multipart_upload(
        Bucket=bucket, Key="other-run/x.bin", UploadId=other["UploadId"]
    )


def test_emergency_copies_unchanged_files_server_side(
    staging: Any, s3_client: Any, bucket: str
) -> None:
    store, sync, local = staging
    frozen = os.urandom(2 * PART + 7)
    first = SlowWriter(local, 1)
    first.write("frozen.bin", frozen)
    first.write("model.pt", os.urandom(300_000))
    first.finish()
    sync.flush()
    sync.begin_emergency()  # the stager learns of step 1 as the previous commit
    sync.stager.stop()  # drive scans by hand below
    second = SlowWriter(local, 2)
    second.write("frozen.bin", frozen)
    second.write("model.pt", os.urandom(300_000))
    sync.stager.scan()
    second.finish()
    with capture_logs() as logs:
        assert sync.flush() == 2
    copied = events(logs, "file_copied")
    assert [e["bytes"] for e in copied] == [len(frozen)]
    body = s3_client.get_object(Bucket=bucket, Key=store.file_key(2, "frozen.bin"))["Body"].read()
    assert body == frozen


SLOW_TRAINER = """
import os, signal, sys, time
from pathlib import Path
from daemon import layout
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
d = Path(os.environ["SPOT_CHECKPOINT_DIR"])
run = os.environ["SPOT_RUN_ID"]
def save(step, reason, shards, pause):
    with layout.CheckpointWriter(d, run, step, reason) as w:
        for i in range(shards):
            with w.open_file(f"shard-{i}.bin") as f:
                f.write(os.urandom(6 * 1024 * 1024))
            print(f"shard_written step={step} i={i}", flush=True)
            time.sleep(pause)
        w.commit()
    print(f"checkpoint_saved step={step} reason={reason}", flush=True)
if not layout.list_step_dirs(d):
    save(1, "periodic", 1, 0)
while not stop:
    time.sleep(0.05)
save(2, "interrupt", 4, 0.6)  # a slow emergency save: each shard is final before the next
"""


def test_supervisor_stages_the_emergency_checkpoint_while_it_is_written(
    tmp_path: Path, s3_server: LocalS3, s3_client: Any, bucket: str
) -> None:
    import datetime as dt
    import sys

    from daemon.standins import FAKE_AWS_ENV
    from daemon.standins.demo import SupervisorProcess, write_config
    from daemon.standins.emulator import MetadataEmulator

    script = tmp_path / "slow_trainer.py"
    script.write_text(SLOW_TRAINER)
    with MetadataEmulator() as md:
        cfg = write_config(
            tmp_path / "config.toml",
            run_id=RUN,
            command=[sys.executable, str(script)],
            local_dir=tmp_path / "ckpt",
            remote=f"s3://{bucket}/runs",
            endpoint_url=s3_server.endpoint_url,
            imds_url=md.url,
            runtime_dir=tmp_path / "run",
            poll_interval=0.2,
            extra={"s3": {"part_size_mb": 5, "max_concurrency": 4}},
        )
        env = {**os.environ, **FAKE_AWS_ENV, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        sup = SupervisorProcess(cfg, env).start()
        try:
            sup.wait_for(
                lambda e: e.get("event") == "checkpoint_committed" and e["step"] == 1, 60, "step 1"
            )
            md.set_notice("terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60))
            assert sup.wait_exit(60) == 0
        finally:
            if sup.proc is not None and sup.proc.poll() is None:
                sup.proc.kill()
                sup.proc.wait()
    # Followed as .partial (sent while written) or seen renamed: either way before the end.
    staged = [e for e in sup.find("file_staged") + sup.find("file_followed") if e["step"] == 2]
    assert len(staged) >= 3  # the first shards went up while later ones were written
    (taken,) = [e for e in sup.find("staged_files_taken") if e["step"] == 2]
    assert taken["files"] >= 3 and taken["listed"] == 4
    (done,) = sup.find("emergency_committed")
    assert done["committed_step"] == 2 and done["bytes_staged"] >= 3 * 6 * MiB
    assert not done["uploads_cancelled"]
    committed = CheckpointStore(
        make_s3_client(s3_server.endpoint_url, "us-east-1", 4), RemoteLocation(bucket, "runs"), RUN
    ).list_committed()
    assert [c.step for c in committed] == [2, 1]
    assert open_uploads(s3_client, bucket) == []


def test_emergency_commit_is_pending_until_hashed_then_retention_runs(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """Staged files are checked by ETag at the commit, not by sha256: the commit is
    pending, the verifier hashes them afterwards, and only then does retention delete."""
    local = tmp_path / "ckpt"
    with store_and_sync(s3_server, bucket, local, keep_remote=1) as (store, sync):
        make_checkpoint(local, 1)
        sync.sync_pass(skip_superseded=True, reason="background")
        (first,) = store.list_committed()
        assert first.verified  # sent by the background path: sha256-checked before

        w = SlowWriter(local, 2)
        w.write("shard-0.bin", os.urandom(3 * PART + 1))  # multipart: ETag of part MD5s
        w.write("model.pt", os.urandom(300_000))  # single PUT: plain MD5
        sync.stager.scan()
        w.finish()
        with capture_logs() as logs:
            assert sync.flush() == 2
            assert sync.wait_verified(60)
        (taken,) = events(logs, "staged_files_taken")
        assert (taken["files"], taken["sha256_pending"]) == (2, 2)
        (checked,) = events(logs, "checkpoint_etags_checked")
        assert checked["checked"] == 2 and checked["unchecked"] == {}
        (committed,) = events(logs, "checkpoint_committed")
        assert committed["verified"] is False and committed["bytes_staged"] > 3 * PART
        names = [e["event"] for e in logs]
        # Retention waited for the sha256 of the pending commit.
        assert names.index("checkpoint_sha256_verified") < names.index("retention_applied")
        (applied,) = events(logs, "retention_applied")
        assert applied["deleted"] == [1]
        (ckpt,) = store.list_committed()
        assert ckpt.step == 2 and ckpt.verified


def test_emergency_commit_whose_bytes_do_not_match_its_manifest_is_withdrawn(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    """A writer whose manifest names another sha256 than the bytes it wrote: the server
    holds the bytes we read (ETag), the verifier finds the sha256 wrong and withdraws the
    commit; the older one was never deleted for it."""
    local = tmp_path / "ckpt"
    with store_and_sync(s3_server, bucket, local, keep_remote=1) as (store, sync):
        make_checkpoint(local, 1)
        sync.sync_pass(skip_superseded=True, reason="background")
        w = SlowWriter(local, 2)
        w.write("shard-0.bin", os.urandom(PART + 1))
        sync.stager.scan()
        w.files["shard-0.bin"] = os.urandom(PART + 1)  # the manifest's sha256 lies
        w.finish()
        with capture_logs() as logs:
            sync.flush()
            assert sync.wait_verified(60)
        (failed,) = events(logs, "checkpoint_verification_failed")
        assert failed["step"] == 2 and failed["log_level"] == "error"
        assert not events(logs, "retention_applied")
        assert [c.step for c in store.list_committed()] == [1]
        assert 2 not in sync.committed_steps


def test_staging_never_writes_into_a_step_already_committed(
    staging: Any, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """Issue 13: a second instance (an early replacement that lost a lease race, an
    operator's mistake) writing a step another already committed must not replace that
    commit's objects with its staged bytes."""
    store, sync, local = staging
    theirs, _ = make_checkpoint(tmp_path / "theirs", 9)
    store.upload_checkpoint(theirs, layout.load_complete(theirs))
    before = {o["Key"]: o["ETag"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    w = SlowWriter(local, 9)
    w.write("shard-0.bin", os.urandom(5000))
    with capture_logs() as logs:
        assert sync.stager.scan() == 0
    refused = events(logs, "staging_refused_committed_step")
    assert len(refused) == 1 and refused[0]["step"] == 9
    after = {o["Key"]: o["ETag"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert after == before
