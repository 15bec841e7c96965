"""Background sync against moto's S3 server over HTTP: newest first, superseded ones
skipped only when bandwidth is short, retention after a verified newer commit (manifest
first), server-side copies of unchanged files, rescans that find what inotify missed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_pipeline import make_store
from test_store import PART, RUN, events, make_checkpoint

from daemon import layout
from daemon.deadline import ThroughputEstimate
from daemon.standins import LocalS3
from daemon.storage.store import CheckpointStore
from daemon.storage.sync import CheckpointSync


@pytest.fixture
def store(s3_server: LocalS3, bucket: str) -> Iterator[CheckpointStore]:
    s = make_store(s3_server, bucket)
    yield s
    s.close()


def local_steps(local: Path, steps: list[int], gap_s: float) -> None:
    """Checkpoints ``gap_s`` seconds apart (by their directories' mtimes)."""
    now = time.time()
    for i, step in enumerate(steps):
        path, _ = make_checkpoint(local, step)
        t = now - (len(steps) - i) * gap_s
        os.utime(path, (t, t))


def test_newest_first_and_superseded_skipped_when_bandwidth_is_short(
    store: CheckpointStore, tmp_path: Path
) -> None:
    local = tmp_path / "ckpt"
    # Saved back to back: no bandwidth sends a checkpoint before the next one is there.
    local_steps(local, [1, 2, 3], gap_s=0)
    sync = CheckpointSync(store, local, ThroughputEstimate(), rescan_interval=60)
    with capture_logs() as logs:
        sync.sync_pass(skip_superseded=True, reason="background")
    assert [e["step"] for e in events(logs, "checkpoint_committed")] == [3]
    skipped = events(logs, "checkpoint_superseded")
    assert [(e["step"], e["skipped"]) for e in skipped] == [(2, True), (1, True)]
    assert skipped[0]["backlog_s"] > skipped[0]["save_interval_s"] == 0
    assert skipped[0]["throughput_mbps"] > 0 and skipped[0]["bytes"] > 0


def test_superseded_still_sent_when_bandwidth_suffices(
    store: CheckpointStore, tmp_path: Path
) -> None:
    local = tmp_path / "ckpt"
    local_steps(local, [1, 2, 3], gap_s=100)
    sync = CheckpointSync(store, local, ThroughputEstimate(initial_bps=1e9), rescan_interval=60)
    with capture_logs() as logs:
        sync.sync_pass(skip_superseded=True, reason="background")
    assert [e["step"] for e in events(logs, "checkpoint_committed")] == [3, 2, 1]
    assert all(not e["skipped"] for e in events(logs, "checkpoint_superseded"))


def test_retention_deletes_only_after_newer_verified_manifest_first(
    store: CheckpointStore, tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    local = tmp_path / "ckpt"
    sync = CheckpointSync(store, local, ThroughputEstimate(), rescan_interval=60, keep_remote=2)
    sent: list[tuple[str, list[str]]] = []

    def record(params: Any, model: Any, **_: Any) -> None:
        keys = [o["Key"] for o in params.get("Delete", {}).get("Objects", [])]
        sent.append((model.name, keys or [params.get("Key", "")]))

    store.client.meta.events.register("before-parameter-build.s3.DeleteObject", record)
    store.client.meta.events.register("before-parameter-build.s3.DeleteObjects", record)
    for step in (1, 2, 3):
        make_checkpoint(local, step)
        with capture_logs() as logs:
            sync.sync_pass(skip_superseded=True, reason="background")
    assert [c.step for c in store.list_committed()] == [3, 2]
    (applied,) = events(logs, "retention_applied")
    assert (applied["kept"], applied["deleted"]) == ([3, 2], [1])
    # The manifest (the commit) goes first, then the data.
    assert sent[0] == ("DeleteObject", [store.file_key(1, layout.MANIFEST_NAME)])
    assert sent[1][0] == "DeleteObjects" and store.file_key(1, "model.pt") in sent[1][1]
    assert s3_client.list_objects_v2(Bucket=bucket, Prefix=store.step_prefix(1))["KeyCount"] == 0
    # A deleted step still on local disk is not sent back up.
    with capture_logs() as logs:
        sync.sync_pass(skip_superseded=False, reason="background")
    assert not events(logs, "checkpoint_committed")


def test_retention_keeps_old_ones_while_the_newer_is_not_verified(
    store: CheckpointStore, tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    for step in (1, 2, 3):
        store.upload_checkpoint(*make_checkpoint(tmp_path / "src", step))
    s3_client.delete_object(Bucket=bucket, Key=store.file_key(3, "model.pt"))  # 3 is broken
    assert store.apply_retention(2) == []  # 3 does not count: keeps 2 and 1
    assert [c.step for c in store.list_committed()] == [2, 1]
    assert store.apply_retention(1) == [1]


def test_unchanged_files_are_copied_server_side_bytes_saved(
    store: CheckpointStore, tmp_path: Path
) -> None:
    local = tmp_path / "ckpt"
    frozen = os.urandom(3 * PART + 1)  # multipart-sized, and the same in both checkpoints

    def save(step: int) -> None:
        with layout.CheckpointWriter(local, RUN, step, "periodic") as w:
            w.add_bytes("embeddings.bin", frozen)
            w.add_bytes("model.pt", os.urandom(400_000))
            w.add_bytes("optimizer.pt", os.urandom(800_000))
            w.commit()

    sync = CheckpointSync(store, local, ThroughputEstimate(), rescan_interval=60)
    save(1)
    sync.sync_pass(skip_superseded=True, reason="background")
    first_sent = sync.stats.bytes_uploaded
    save(2)
    with capture_logs() as logs:
        sync.sync_pass(skip_superseded=True, reason="background")
    (committed,) = events(logs, "checkpoint_committed")
    assert committed["step"] == 2
    assert committed["bytes_copied"] == len(frozen)
    assert committed["bytes_sent"] == 1_200_000  # what changed, not the frozen part
    assert sync.stats.bytes_copied == len(frozen)
    assert sync.stats.bytes_uploaded - first_sent == 1_200_000
    # The copy is a real, complete object: restore verifies every sha256 of step 2.
    restored = store.restore_newest(tmp_path / "dest")
    assert restored is not None and restored.step == 2
    assert (restored.path / "embeddings.bin").read_bytes() == frozen


def test_rescan_at_start_and_in_the_final_flush_finds_what_inotify_missed(
    store: CheckpointStore, tmp_path: Path
) -> None:
    local = tmp_path / "ckpt"
    make_checkpoint(local, 1)  # before the watch exists: no event for it ever
    sync = CheckpointSync(store, local, ThroughputEstimate(), rescan_interval=3600)
    sync.load_remote()
    with capture_logs() as logs:
        sync.start()
        deadline = time.monotonic() + 30
        while 1 not in sync.committed_steps and time.monotonic() < deadline:
            time.sleep(0.05)
        sync.stop()
        make_checkpoint(local, 2)  # after the watch is gone
        assert sync.flush() == 2
    assert [e["step"] for e in events(logs, "checkpoint_committed")] == [1, 2]


class _Fatal(BaseException):
    """Stands for what no `except Exception` catches (a library's BaseException)."""


def _wait_until(pred: Any, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_a_failing_sync_pass_is_logged_and_the_thread_goes_on(
    store: CheckpointStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: an exception out of one pass ended the sync thread, and with it every
    commit for the rest of the run, without a word."""
    local = tmp_path / "ckpt"
    sync = CheckpointSync(store, local, ThroughputEstimate(), rescan_interval=60)
    real = sync.sync_pass
    calls: list[str] = []

    def flaky(skip_superseded: bool, reason: str, retry_failed: bool = False) -> None:
        calls.append(reason)
        if len(calls) == 1:
            raise RuntimeError("a bug in one pass")
        real(skip_superseded, reason, retry_failed)

    monkeypatch.setattr(sync, "sync_pass", flaky)
    with capture_logs() as logs:
        sync.start()
        assert _wait_until(lambda: len(calls) >= 1)
        make_checkpoint(local, 5)
        sync.wake()
        assert _wait_until(lambda: sync.stats.newest_committed_step == 5)
        sync.stop()
    failed = events(logs, "sync_pass_failed")
    assert len(failed) == 1 and failed[0]["log_level"] == "error"
    assert sync.stats.failures >= 1


def test_main_loop_restarts_a_sync_thread_that_died(
    store: CheckpointStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: nothing watched the sync thread; the supervisor's loop now calls
    `restart_if_dead` every turn, which logs `sync_thread_died` and starts it again."""
    local = tmp_path / "ckpt"
    sync = CheckpointSync(store, local, ThroughputEstimate(), rescan_interval=60)
    real = sync.sync_pass
    calls: list[str] = []

    def fatal_once(skip_superseded: bool, reason: str, retry_failed: bool = False) -> None:
        calls.append(reason)
        if len(calls) == 1:
            raise _Fatal()
        real(skip_superseded, reason, retry_failed)

    monkeypatch.setattr(sync, "sync_pass", fatal_once)
    monkeypatch.setattr("threading.excepthook", lambda _args: None)  # the death is expected
    with capture_logs() as logs:
        sync.start()
        assert sync._thread is not None
        assert _wait_until(lambda: sync._thread is not None and not sync._thread.is_alive())
        assert sync.restart_if_dead() is True
        assert sync.restart_if_dead() is False  # alive again
        make_checkpoint(local, 7)
        sync.wake()
        assert _wait_until(lambda: sync.stats.newest_committed_step == 7)
        sync.stop()
        assert sync.restart_if_dead() is False  # stopped on purpose is not dead
    died = events(logs, "sync_thread_died")
    assert len(died) == 1 and died[0]["log_level"] == "error"
