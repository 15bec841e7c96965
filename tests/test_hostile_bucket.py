"""Hostile or broken objects in the bucket never stop a boot (issue 11).

Objects are written straight into moto's S3 server (over HTTP) with boto3, the way a
broken or hostile writer would leave them; the store must then skip every remote
checkpoint it cannot restore, with a warning, and restore the next older good one.
Also: the sync never uploads a file reached through a symlink in a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_cli_commands import RUN_ID as CLI_RUN_ID
from test_cli_commands import cli, make_config
from test_store import RUN, events, make_checkpoint, make_store, same_tree

from daemon import layout
from daemon.deadline import ThroughputEstimate
from daemon.layout import MANIFEST_NAME, list_step_dirs, step_dir_name
from daemon.standins import FAKE_AWS_ENV, LocalS3
from daemon.standins.demo import SupervisorProcess, write_config
from daemon.standins.emulator import MetadataEmulator
from daemon.storage import listing as store_mod  # where the size limits are read
from daemon.storage.download import download_checkpoint
from daemon.storage.pipeline import Stager
from daemon.storage.s3client import IntegrityError, RemoteLocation
from daemon.storage.store import CheckpointStore
from daemon.storage.sync import CheckpointSync

GOOD, BAD = 10, 20
REPO = Path(__file__).resolve().parent.parent


def entry(path: str, data: bytes) -> dict[str, Any]:
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def manifest_doc(step: int, files: list[dict[str, Any]], reason: str = "periodic") -> bytes:
    doc = {
        "format": layout.MANIFEST_FORMAT,
        "run_id": RUN,
        "step": step,
        "created_at": layout.utc_now_iso(),
        "reason": reason,
        "files": files,
    }
    return json.dumps(doc).encode()


def put_checkpoint(
    s3_client: Any,
    bucket: str,
    store: CheckpointStore,
    step: int,
    objects: dict[str, bytes],
    listed: list[dict[str, Any]] | None = None,
    *,
    pad: int = 0,
) -> str:
    """Write ``objects`` under the step, then a manifest listing ``listed`` (default: the
    objects as they are) padded with ``pad`` spaces; the manifest's key."""
    for path, data in objects.items():
        s3_client.put_object(Bucket=bucket, Key=store.file_key(step, path), Body=data)
    files = listed if listed is not None else [entry(p, d) for p, d in objects.items()]
    key = store.file_key(step, MANIFEST_NAME)
    body = manifest_doc(step, files) + b" " * pad
    s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    return key


def skip_warnings(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    """The warnings that say a remote checkpoint was passed over."""
    return [
        e
        for e in logs
        if e["event"] in ("remote_checkpoint_ignored", "restore_skipped")
        and e["log_level"] == "warning"
    ]


@pytest.fixture
def store(s3_server: LocalS3, bucket: str) -> Iterator[CheckpointStore]:
    s = make_store(s3_server, bucket)
    yield s
    s.close()


@pytest.fixture
def good(store: CheckpointStore, tmp_path: Path) -> Path:
    """An older checkpoint that restores fine: the one every test must fall back to."""
    src, manifest = make_checkpoint(tmp_path / "src", GOOD)
    store.upload_checkpoint(src, manifest)
    return src


def restore_falls_back(store: CheckpointStore, good: Path, dest: Path, bad_step: int = BAD) -> Any:
    """Restore into ``dest``: the good checkpoint, with a warning for ``bad_step``."""
    with capture_logs() as logs:
        result = store.restore_newest(dest)
    assert result is not None and result.step == GOOD and result.downloaded
    same_tree(good, result.path)
    assert [s for s, _ in list_step_dirs(dest)] == [GOOD]
    assert sorted(p.name for p in dest.iterdir()) == [step_dir_name(GOOD)]  # no leftovers
    warned = [e for e in skip_warnings(logs) if e["step"] == bad_step]
    assert warned, logs
    return warned


# -- manifests whose paths cannot be restored ----------------------------------------------


def test_manifest_listing_a_path_as_both_file_and_directory_is_skipped(
    store: CheckpointStore, good: Path, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    put_checkpoint(s3_client, bucket, store, BAD, {"a": b"file", "a/b": b"under it"})
    (warned,) = restore_falls_back(store, good, tmp_path / "dest")
    assert "a/b" in warned["reason"]


def test_manifest_with_a_name_too_long_for_the_filesystem_is_skipped(
    store: CheckpointStore, good: Path, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    name = "x" * 300  # NAME_MAX is 255 bytes on ext4, xfs, btrfs, tmpfs
    put_checkpoint(s3_client, bucket, store, BAD, {name: b"data", "ok.bin": b"fine"})
    (warned,) = restore_falls_back(store, good, tmp_path / "dest")
    assert "too long" in warned["reason"]


@pytest.mark.parametrize(
    "path",
    [
        "../escape.bin",
        "sub/../../escape.bin",
        "/etc/escape.bin",
        "sub//empty-component.bin",
        "sub/./dot-component.bin",
        "trailing-slash/",
        "nul\x00byte.bin",
    ],
)
def test_manifest_path_that_is_not_a_plain_relative_path_is_skipped(
    store: CheckpointStore, good: Path, s3_client: Any, bucket: str, tmp_path: Path, path: str
) -> None:
    data = b"hostile"
    # The object is there under the key the manifest names, so only the path can tell.
    key = store.file_key(BAD, path)
    s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    put_checkpoint(s3_client, bucket, store, BAD, {}, [entry(path, data)])
    restore_falls_back(store, good, tmp_path / "dest")
    assert not (tmp_path / "escape.bin").exists() and not Path("/etc/escape.bin").exists()


def test_download_of_a_name_the_filesystem_rejects_is_an_integrity_error(
    store: CheckpointStore, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """Below the manifest checks (a filesystem with a shorter NAME_MAX than the format's
    limit): the local error is about this checkpoint's names, not about the disk."""
    name = "y" * 300
    data = b"bytes"
    s3_client.put_object(Bucket=bucket, Key=store.file_key(BAD, name), Body=data)
    manifest = layout.Manifest(
        RUN, BAD, layout.utc_now_iso(), "periodic", (layout.FileEntry(name, 5, _sha(data)),)
    )
    objects = store._step_objects(BAD)
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError, match="too long"):
        download_checkpoint(
            store.client,
            store.location,
            manifest,
            manifest.to_json(),
            objects,
            dest,
            part_size=8 * 1024 * 1024,
            max_concurrency=2,
        )
    assert list(dest.iterdir()) == []


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- objects that do not match their manifest ---------------------------------------------


def test_object_with_the_wrong_size_is_skipped(
    store: CheckpointStore, good: Path, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    data = b"the real bytes"
    put_checkpoint(
        s3_client, bucket, store, BAD, {"model.pt": data + b"!"}, [entry("model.pt", data)]
    )
    restore_falls_back(store, good, tmp_path / "dest")


def test_object_with_the_wrong_sha256_is_skipped(
    store: CheckpointStore, good: Path, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    data = b"the real bytes"
    other = bytes(reversed(data))  # same size: only the sha256 can tell
    put_checkpoint(s3_client, bucket, store, BAD, {"model.pt": other}, [entry("model.pt", data)])
    (warned,) = restore_falls_back(store, good, tmp_path / "dest")
    assert "sha256" in warned["reason"]


def test_missing_object_is_skipped(
    store: CheckpointStore, good: Path, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    put_checkpoint(
        s3_client,
        bucket,
        store,
        BAD,
        {"model.pt": b"here"},
        [entry("model.pt", b"here"), entry("gone.pt", b"never uploaded")],
    )
    (warned,) = restore_falls_back(store, good, tmp_path / "dest")
    assert warned["key"].endswith("gone.pt")


def test_manifest_that_is_not_json_is_skipped(
    store: CheckpointStore, good: Path, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    s3_client.put_object(Bucket=bucket, Key=store.file_key(BAD, MANIFEST_NAME), Body=b"\xff{")
    restore_falls_back(store, good, tmp_path / "dest")


# -- size limits on what is read into memory ----------------------------------------------


def test_manifest_over_the_size_limit_is_skipped_unread(
    store: CheckpointStore,
    good: Path,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real limit is 64 MiB; a small one keeps the test small. Valid JSON otherwise.
    monkeypatch.setattr(store_mod, "MAX_MANIFEST_BYTES", 4096, raising=False)
    key = put_checkpoint(s3_client, bucket, store, BAD, {"model.pt": b"ok"}, pad=10_000)
    (warned,) = restore_falls_back(store, good, tmp_path / "dest")
    assert warned["key"] == key and "4096" in warned["reason"]
    size = s3_client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    assert str(size) in warned["reason"]


def test_manifest_grown_over_the_limit_after_listing_is_not_read(
    store: CheckpointStore, s3_client: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing said small, the GET says large: the body is not read past the limit."""
    monkeypatch.setattr(store_mod, "MAX_MANIFEST_BYTES", 4096, raising=False)
    key = store.file_key(BAD, MANIFEST_NAME)
    s3_client.put_object(Bucket=bucket, Key=key, Body=b" " * 10_000)
    with pytest.raises(IntegrityError, match=r"10000 bytes.*4096"):
        store._get_object(key, missing_ok=False, max_bytes=4096)


def final_checkpoint(store: CheckpointStore, local: Path, step: int, reason: str) -> None:
    with layout.CheckpointWriter(local, RUN, step, reason) as w:
        w.add_bytes("model.pt", os.urandom(1000))
        manifest = w.commit()
    store.upload_checkpoint(w.final_dir, manifest)


@pytest.mark.parametrize("body", [b"{not json", b'{"step": "12"}', b"[]", b"\xff\xfe"])
def test_unreadable_complete_json_with_a_final_newest_checkpoint_means_complete(
    store: CheckpointStore, s3_client: Any, bucket: str, tmp_path: Path, body: bytes
) -> None:
    final_checkpoint(store, tmp_path / "src", 30, "final")
    s3_client.put_object(Bucket=bucket, Key=store.complete_key, Body=body)
    with capture_logs() as logs:
        complete = store.read_complete()
    assert complete is not None and complete["step"] == 30
    (warned,) = events(logs, "complete_marker_invalid")
    assert warned["log_level"] == "warning" and warned["key"] == store.complete_key
    assert warned["newest_committed_step"] == 30 and warned["newest_reason"] == "final"


def test_unreadable_complete_json_without_a_final_checkpoint_does_not_end_the_run(
    store: CheckpointStore, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    final_checkpoint(store, tmp_path / "src", 30, "periodic")
    s3_client.put_object(Bucket=bucket, Key=store.complete_key, Body=b"{not json")
    with capture_logs() as logs:
        assert store.read_complete() is None
    (warned,) = events(logs, "complete_marker_invalid")
    assert warned["log_level"] == "warning" and "not JSON" in warned["reason"]
    assert warned["newest_reason"] == "periodic"


def test_complete_json_over_the_size_limit_is_not_read(
    store: CheckpointStore, s3_client: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "MAX_COMPLETE_BYTES", 64, raising=False)
    body = json.dumps({"step": 5, "completed_at": "2026-01-01T00:00:00Z"}).encode()
    s3_client.put_object(Bucket=bucket, Key=store.complete_key, Body=body + b" " * 1000)
    with capture_logs() as logs:
        assert store.read_complete() is None  # no checkpoint at all: nothing is complete
    (warned,) = events(logs, "complete_marker_invalid")
    assert "64" in warned["reason"] and str(len(body) + 1000) in warned["reason"]


def test_complete_json_returns_only_its_known_fields(
    store: CheckpointStore, s3_client: Any, bucket: str
) -> None:
    """Callers log ``**complete``: keys like ``event`` or ``run_id`` must not reach them."""
    body = {"step": 7, "completed_at": "x", "event": "boom", "run_id": "other", "n": [1] * 9}
    s3_client.put_object(Bucket=bucket, Key=store.complete_key, Body=json.dumps(body).encode())
    assert store.read_complete() == {"step": 7, "completed_at": "x"}


def test_boot_with_a_complete_json_carrying_hostile_keys_exits_done(
    tmp_path: Path, s3_server: LocalS3, s3_client: Any, bucket: str, emulator: MetadataEmulator
) -> None:
    run_id = "hostile-run"
    cfg = write_config(
        tmp_path / "config.toml",
        run_id=run_id,
        command=["/bin/false"],
        local_dir=tmp_path / "ckpt",
        remote=f"s3://{bucket}/runs",
        endpoint_url=s3_server.endpoint_url,
        imds_url=emulator.url,
        runtime_dir=tmp_path / "run",
    )
    body = json.dumps({"step": 3, "completed_at": "x", "run_id": "other", "event": "x"})
    s3_client.put_object(Bucket=bucket, Key=f"runs/{run_id}/complete.json", Body=body.encode())
    env = {**os.environ, **FAKE_AWS_ENV, "PYTHONPATH": str(REPO)}
    sup = SupervisorProcess(cfg, env).start()
    assert sup.wait_exit(60) == 0, "\n".join(sup.lines[-20:])
    assert sup.find("run_already_complete") and not sup.find("child_started")


# -- end to end: the CLI restores the older good checkpoint -------------------------------


def test_cli_restore_skips_hostile_manifests_and_restores_the_older_good_one(
    tmp_path: Path, s3_server: LocalS3, s3_client: Any, bucket: str
) -> None:
    client = make_store(s3_server, bucket).client
    cli_store = CheckpointStore(client, RemoteLocation(bucket, "p"), CLI_RUN_ID)
    with layout.CheckpointWriter(tmp_path / "src", CLI_RUN_ID, GOOD, "periodic") as w:
        w.add_bytes("model.pt", os.urandom(50_000))
        manifest = w.commit()
    cli_store.upload_checkpoint(w.final_dir, manifest)
    put_checkpoint(s3_client, bucket, cli_store, 20, {"a": b"file", "a/b": b"under it"})
    put_checkpoint(s3_client, bucket, cli_store, 30, {"z" * 300: b"long"})
    put_checkpoint(s3_client, bucket, cli_store, 40, {"m.pt": b"ok"}, [entry("m.pt", b"ko")])

    cfg = make_config(tmp_path, s3_server, bucket, "http://127.0.0.1:9", local="fresh")
    r = cli("restore", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"restored step {GOOD}" in r.stdout
    same_tree(w.final_dir, tmp_path / "fresh" / step_dir_name(GOOD))
    warned = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    skipped = {e["step"] for e in warned if e.get("level") == "warning" and "step" in e}
    assert {20, 30, 40} <= skipped, r.stdout


# -- uploads never follow a symlink out of the checkpoint ---------------------------------


def symlinked_checkpoint(local: Path, outside: Path, step: int, how: str) -> tuple[Path, str]:
    """A complete-looking ``step-*`` whose manifest lists a file reached through a symlink
    to ``outside`` (the file itself, or a parent directory inside the step dir)."""
    outside.mkdir(parents=True, exist_ok=True)
    secret = b"root:x:0:0:secret\n"
    (outside / "secret.txt").write_bytes(secret)
    ckpt = local / step_dir_name(step)
    ckpt.mkdir(parents=True)
    model = os.urandom(2000)
    (ckpt / "model.pt").write_bytes(model)
    if how == "file":
        rel = "secret.txt"
        os.symlink(outside / "secret.txt", ckpt / rel)
    else:
        rel = "sub/secret.txt"
        os.symlink(outside, ckpt / "sub")
    (ckpt / MANIFEST_NAME).write_bytes(
        manifest_doc(step, [entry("model.pt", model), entry(rel, secret)])
    )
    return ckpt, rel


@pytest.mark.parametrize("how", ["file", "parent_dir"])
def test_sync_refuses_a_checkpoint_listing_a_symlink_out_of_the_step_dir(
    store: CheckpointStore, s3_client: Any, bucket: str, tmp_path: Path, how: str
) -> None:
    local = tmp_path / "ckpt"
    ckpt, rel = symlinked_checkpoint(local, tmp_path / "outside", 7, how)
    sync = CheckpointSync(store, local, ThroughputEstimate(), rescan_interval=60)
    try:
        with capture_logs() as logs:
            sync.sync_pass(skip_superseded=False, reason="flush", retry_failed=True)
    finally:
        sync.stager.close()
    assert not events(logs, "checkpoint_committed")
    warned = [e for e in logs if e["log_level"] == "warning" and "symlink" in str(e)]
    assert warned and str(ckpt / rel) in str(warned[0]), logs
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=store.step_prefix(7))
    assert listed.get("KeyCount", 0) == 0  # not even model.pt


@pytest.mark.parametrize("how", ["file", "parent_dir"])
def test_upload_checkpoint_refuses_a_symlinked_file_before_sending_anything(
    store: CheckpointStore, s3_client: Any, bucket: str, tmp_path: Path, how: str
) -> None:
    ckpt, rel = symlinked_checkpoint(tmp_path / "ckpt", tmp_path / "outside", 7, how)
    manifest = layout.parse_manifest((ckpt / MANIFEST_NAME).read_bytes())
    with capture_logs() as logs, pytest.raises(IntegrityError, match="symlink"):
        store.upload_checkpoint(ckpt, manifest)
    (refused,) = events(logs, "upload_refused")
    assert refused["log_level"] == "warning" and refused["path"] == str(ckpt / rel)
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=store.step_prefix(7))
    assert listed.get("KeyCount", 0) == 0


def test_stager_never_uploads_a_symlink_in_a_tmp_step_dir(
    store: CheckpointStore, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    local = tmp_path / "ckpt"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    tmp = local / f".tmp-{step_dir_name(9)}-writer"
    tmp.mkdir(parents=True)
    (tmp / "model.pt").write_bytes(b"weights")
    os.symlink(outside / "secret.txt", tmp / "leak.txt")
    os.symlink(outside, tmp / "leakdir")
    # A whole writer's directory that is a symlink out of local_dir.
    os.symlink(outside, local / f".tmp-{step_dir_name(11)}-evil")
    stager = Stager(store, local)
    try:
        with capture_logs() as logs:
            assert stager.scan() == 1
            assert stager.scan() == 0
        for staged in list(stager._dirs[9].files.values()):
            store.wait_upload(staged.transfer, staged.key)
    finally:
        stager.close()
    assert [e["path"] for e in events(logs, "file_staged")] == ["model.pt"]
    (refused,) = events(logs, "staging_refused")  # once, not on every rescan
    assert refused["log_level"] == "warning" and refused["path"] == str(tmp / "leak.txt")
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert keys == {store.file_key(9, "model.pt")}
