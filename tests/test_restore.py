"""Restore against moto's S3 server over real HTTP: newest verified wins, bad ones skipped.

The checkpoint helpers come from the sibling test_store (tests/ is not a package; pytest
puts it on sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_store import events, make_checkpoint, make_store, same_tree

from daemon.layout import list_step_dirs, load_complete, step_dir_name
from daemon.standins import LocalS3
from daemon.storage.store import CheckpointStore


def commit_steps_10_and_20(store: CheckpointStore, src: Path) -> tuple[Path, Path]:
    """Big checkpoints (ranged GETs on the way down) of steps 10 and 20, made under
    ``src`` and committed: their directories."""
    src10, m10 = make_checkpoint(src, 10, big=True)
    src20, m20 = make_checkpoint(src, 20, big=True)
    store.upload_checkpoint(src10, m10)
    store.upload_checkpoint(src20, m20)
    return src10, src20


def leftovers(local_dir: Path) -> list[str]:
    return sorted(p.name for p in local_dir.iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("prefix", ["", "spot-runs"])
def test_restore_roundtrip_is_byte_identical(
    s3_server: LocalS3, bucket: str, tmp_path: Path, prefix: str
) -> None:
    store = make_store(s3_server, bucket, prefix)
    src, manifest = make_checkpoint(tmp_path / "src", 40, big=True)
    store.upload_checkpoint(src, manifest)

    dest = tmp_path / "dest"
    with capture_logs() as logs:
        result = store.restore_newest(dest)
    assert result is not None and result.downloaded
    assert (result.step, result.path, result.bytes) == (
        40,
        dest / step_dir_name(40),
        manifest.total_bytes,
    )
    same_tree(src, result.path)  # the manifest included, byte for byte
    assert load_complete(result.path) == manifest
    assert leftovers(dest) == []
    (done,) = events(logs, "restore_completed")
    assert done["step"] == 40 and done["bytes"] == manifest.total_bytes


def test_restore_with_nothing_anywhere(s3_server: LocalS3, bucket: str, tmp_path: Path) -> None:
    with capture_logs() as logs:
        assert make_store(s3_server, bucket).restore_newest(tmp_path / "dest") is None
    assert events(logs, "restore_nothing")


@pytest.mark.parametrize("victim", ["model.pt", "state.bin"])  # streamed, and ranged GETs
def test_corrupt_remote_is_skipped_for_the_older_one(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path, victim: str
) -> None:
    store = make_store(s3_server, bucket)
    src10, src20 = commit_steps_10_and_20(store, tmp_path / "src")
    # Same size, other bytes: the listing still looks right, only the sha256 can tell.
    key = store.file_key(20, victim)
    size = (src20 / victim).stat().st_size
    s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(size))

    dest = tmp_path / "dest"
    with capture_logs() as logs:
        result = store.restore_newest(dest)
    assert result is not None and result.step == 10 and result.downloaded
    same_tree(src10, result.path)
    (skipped,) = events(logs, "restore_skipped")
    assert skipped["log_level"] == "warning" and skipped["step"] == 20
    assert key in skipped["reason"] and "sha256" in skipped["reason"]
    assert [s for s, _ in list_step_dirs(dest)] == [10]
    assert leftovers(dest) == []


def test_remote_object_gone_after_listing_is_skipped(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    store = make_store(s3_server, bucket)
    for step in (1, 2):
        store.upload_checkpoint(*make_checkpoint(tmp_path / "src", step))
    committed = store.list_committed()
    # Delete a file between the listing and the download, through the store's own listing.
    s3_client.delete_object(Bucket=bucket, Key=committed[0].keys["optimizer.pt"])
    original = store._iter_committed
    store._iter_committed = lambda **_kw: iter(committed)  # type: ignore[method-assign]
    try:
        with capture_logs() as logs:
            result = store.restore_newest(tmp_path / "dest")
    finally:
        store._iter_committed = original  # type: ignore[method-assign]
    assert result is not None and result.step == 1
    (skipped,) = events(logs, "restore_skipped")
    assert skipped["step"] == 2 and "does not exist" in skipped["reason"]


def test_local_checkpoint_newer_than_remote_is_kept(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    store = make_store(s3_server, bucket)
    store.upload_checkpoint(*make_checkpoint(tmp_path / "src", 20))
    dest = tmp_path / "dest"
    local30, m30 = make_checkpoint(dest, 30)
    before = {p: p.read_bytes() for p in local30.rglob("*") if p.is_file()}
    with capture_logs() as logs:
        result = store.restore_newest(dest)
    assert result is not None and not result.downloaded
    assert (result.step, result.path, result.bytes) == (30, local30, m30.total_bytes)
    assert [s for s, _ in list_step_dirs(dest)] == [30]  # step 20 was not downloaded
    assert {p: p.read_bytes() for p in local30.rglob("*") if p.is_file()} == before
    (kept,) = events(logs, "restore_local_kept")
    assert (kept["step"], kept["remote_step"]) == (30, 20)


def test_local_checkpoint_as_new_as_remote_is_kept(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    store = make_store(s3_server, bucket)
    store.upload_checkpoint(*make_checkpoint(dest, 20))
    result = store.restore_newest(dest)
    assert result is not None and not result.downloaded and result.step == 20


def test_older_local_checkpoint_gets_the_newer_remote(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    store = make_store(s3_server, bucket)
    store.upload_checkpoint(*make_checkpoint(tmp_path / "src", 20))
    dest = tmp_path / "dest"
    make_checkpoint(dest, 10)
    result = store.restore_newest(dest)
    assert result is not None and result.downloaded and result.step == 20
    assert [s for s, _ in list_step_dirs(dest)] == [20, 10]


def test_invalid_local_dir_of_the_same_step_is_replaced(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    store = make_store(s3_server, bucket)
    src, manifest = make_checkpoint(tmp_path / "src", 20)
    store.upload_checkpoint(src, manifest)
    dest = tmp_path / "dest"
    local, _ = make_checkpoint(dest, 20)
    (local / "model.pt").write_bytes(b"torn")  # no longer a complete checkpoint
    with capture_logs() as logs:
        result = store.restore_newest(dest)
    assert result is not None and result.downloaded and result.step == 20
    same_tree(src, result.path)
    assert events(logs, "local_checkpoint_invalid")
    assert leftovers(dest) == []


def test_every_remote_bad_falls_back_to_an_older_local(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    store = make_store(s3_server, bucket)
    src, manifest = make_checkpoint(tmp_path / "src", 20)
    store.upload_checkpoint(src, manifest)
    size = (src / "model.pt").stat().st_size
    s3_client.put_object(Bucket=bucket, Key=store.file_key(20, "model.pt"), Body=os.urandom(size))
    dest = tmp_path / "dest"
    make_checkpoint(dest, 10)
    with capture_logs() as logs:
        result = store.restore_newest(dest)
    assert result is not None and not result.downloaded and result.step == 10
    assert [e["step"] for e in events(logs, "restore_skipped")] == [20]
    assert [s for s, _ in list_step_dirs(dest)] == [10]
