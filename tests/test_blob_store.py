"""Checkpoints on GCS (gcp-storage-emulator) and Azure Blob (Azurite): the same store,
the same guarantees as on S3 — files first and the manifest last, verified bytes,
conditional creates and replaces (leases, the global commit), reads pinned to the listed
version, server-side copies, retention, cancellation — each case against both."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import layout
from daemon.storage.backend import (
    BlobBackend,
    BlobCheckpointStore,
    BlobObject,
    parse_any_remote,
    parse_blob_remote,
)
from daemon.storage.lease import Identity, Leases
from daemon.storage.s3client import StoreError, UploadCancelled
from daemon.storage.store import CheckpointStore

MiB = 1024 * 1024
PART = 5 * MiB
RUN = "blob-run"


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[Any]:
    from daemon.standins.gcs import start_gcs_emulator

    server = start_gcs_emulator()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ.update(server.env())
    yield server
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old
    server.stop()


@pytest.fixture(scope="module")
def azurite_server() -> Iterator[Any]:
    from daemon.standins.azurite import AzuriteUnavailable, start_azurite

    try:
        server = start_azurite()
    except AzuriteUnavailable as exc:  # make install installs it: a missing one is a failure
        pytest.fail(f"{exc} (make install installs Azurite under tests/npm)")
    yield server
    server.stop()


def _backend(kind: str, request: pytest.FixtureRequest) -> BlobBackend:
    name = f"t-{uuid.uuid4().hex[:12]}"
    if kind == "gcs":
        server = request.getfixturevalue("gcs_server")
        server.create_bucket(name)
        from daemon.storage.gcs import GcsBackend

        return GcsBackend(parse_blob_remote(f"gs://{name}/runs"), part_size=PART)
    server = request.getfixturevalue("azurite_server")
    server.create_container(name)
    from azure.storage.blob import BlobServiceClient

    from daemon.storage.azure_blob import AzureBackend

    service = BlobServiceClient.from_connection_string(server.connection_string)
    return AzureBackend(parse_blob_remote(f"az://{name}/runs"), part_size=PART, service=service)


@pytest.fixture(params=["gcs", "azure"])
def store(request: pytest.FixtureRequest) -> Iterator[BlobCheckpointStore]:
    s = BlobCheckpointStore(_backend(request.param, request), RUN, part_size=PART)
    yield s
    s.close()


def _checkpoint(root: Path, step: int, files: dict[str, bytes], reason: str = "periodic") -> Path:
    with layout.CheckpointWriter(root, RUN, step, reason) as w:
        for name, data in files.items():
            w.add_bytes(name, data)
        w.commit()
    return root / layout.step_dir_name(step)


def _commit(store: BlobCheckpointStore, path: Path, **kw: Any) -> Any:
    return store.upload_checkpoint(path, layout.load_complete(path), **kw)


def test_commit_then_restore_verified_with_a_file_larger_than_a_part(
    store: BlobCheckpointStore, tmp_path: Path
) -> None:
    big = os.urandom(2 * PART + 12345)  # GCS: resumable in chunks; Azure: three blocks
    path = _checkpoint(tmp_path / "a", 10, {"model.pt": big, "small.json": b"{}"})
    result = _commit(store, path)
    assert (
        result.remote is not None and result.remote.verified and result.bytes_sent == len(big) + 2
    )
    listed = {o.key.rsplit("/", 1)[-1]: o for o in store.list_objects(store.step_prefix(10))}
    # The service's own MD5 of what it stored is what the commit compared.
    assert listed["model.pt"].etag == hashlib.md5(big, usedforsecurity=False).hexdigest()
    assert isinstance(listed["model.pt"], BlobObject) and listed["model.pt"].version
    assert store.newest_committed_step() == 10
    restored = store.restore_newest(tmp_path / "b")
    assert restored is not None and restored.downloaded and restored.step == 10
    assert (restored.path / "model.pt").read_bytes() == big


def test_unchanged_files_are_copied_server_side(store: BlobCheckpointStore, tmp_path: Path) -> None:
    same = os.urandom(300_000)
    first = _commit(store, _checkpoint(tmp_path, 1, {"frozen.pt": same, "a.pt": b"1"}))
    second = _commit(
        store,
        _checkpoint(tmp_path, 2, {"frozen.pt": same, "a.pt": b"2"}),
        previous=first.remote,
    )
    assert second.bytes_copied == len(same) and second.remote is not None
    assert second.remote.verified


def test_conditional_create_and_replace(store: BlobCheckpointStore) -> None:
    key = store.location.key(RUN, "leases", "slot-0.json")
    v1 = store.write_small(key, b'{"a": 1}', if_none_match=True)
    with pytest.raises(StoreError) as exc:
        store.write_small(key, b'{"a": 2}', if_none_match=True)
    assert exc.value.code == "PreconditionFailed"
    v2 = store.write_small(key, b'{"a": 3}', if_match=v1)
    with pytest.raises(StoreError) as exc:
        store.write_small(key, b'{"a": 4}', if_match=v1)  # a stale version
    assert exc.value.code == "PreconditionFailed"
    assert store.read_small(key) == (b'{"a": 3}', v2)


def test_leases_one_slot_two_instances(store: BlobCheckpointStore) -> None:
    a = Leases(store, 1, Identity.this_boot("node-a", "i-a"), ttl=30)
    b = Leases(store, 1, Identity.this_boot("node-b", "i-b"), ttl=30)
    assert a.try_acquire() is not None
    assert b.try_acquire() is None
    assert a.renew()
    a.release(None)
    taken = b.try_acquire()
    assert taken is not None and taken.how == "released"


def test_global_commit_manifest_is_create_only(store: BlobCheckpointStore) -> None:
    key = store.file_key(7, "manifest.json")
    store.put_manifest(key, b'{"x": 1}', verified=True, if_none_match=True)
    with pytest.raises(StoreError) as exc:
        store.put_manifest(key, b'{"x": 2}', verified=True, if_none_match=True)
    assert exc.value.code == "PreconditionFailed"


def test_restore_reads_only_the_listed_version_and_falls_back(
    store: BlobCheckpointStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _commit(store, _checkpoint(tmp_path / "a", 1, {"w.pt": b"one" * 1000}))
    _commit(store, _checkpoint(tmp_path / "a", 2, {"w.pt": b"two" * 1000}))
    listed = store._iter_committed

    def replace_after_listing(**kw: Any) -> Any:
        for ckpt in listed(**kw):
            if ckpt.step == 2:  # replaced between the listing and the read
                store.backend.put(
                    ckpt.objects["w.pt"].key, b"TWO" * 1000, content_type="x", metadata={}
                )
            yield ckpt

    monkeypatch.setattr(store, "_iter_committed", replace_after_listing)
    restored = store.restore_newest(tmp_path / "b")
    assert restored is not None and restored.step == 1


def test_corrupted_bytes_are_never_restored(store: BlobCheckpointStore, tmp_path: Path) -> None:
    _commit(store, _checkpoint(tmp_path / "a", 1, {"w.pt": b"good" * 500}))
    _commit(store, _checkpoint(tmp_path / "a", 2, {"w.pt": b"also" * 500}))
    store.backend.put(store.file_key(2, "w.pt"), b"evil" * 500, content_type="x", metadata={})
    restored = store.restore_newest(tmp_path / "b")
    assert restored is not None and restored.step == 1


def test_retention_withdraws_manifests_first_and_keeps_the_newest(
    store: BlobCheckpointStore, tmp_path: Path
) -> None:
    for step in (1, 2, 3):
        _commit(store, _checkpoint(tmp_path, step, {"w.pt": os.urandom(1000)}))
    assert store.apply_retention(2) == [1]
    assert [c.step for c in store.list_committed()] == [3, 2]
    assert store.list_objects(store.step_prefix(1)) == []


def test_a_cancelled_commit_writes_no_manifest(store: BlobCheckpointStore, tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, 5, {"w.pt": os.urandom(PART + 1)})
    store.cancel_switch.cancel("test: the notice deadline")
    with pytest.raises(UploadCancelled):
        _commit(store, path)
    assert not store.is_committed(5)
    assert store.abort_incomplete_uploads() == 0  # nothing the services keep to abort


def test_complete_marker_and_writable_probe(store: BlobCheckpointStore) -> None:
    store.check_writable()
    assert store.read_complete() is None
    store.write_complete(9)
    assert store.read_complete() is not None and store.read_complete()["step"] == 9  # type: ignore[index]


def test_a_missing_bucket_is_named(request: pytest.FixtureRequest) -> None:
    for kind in ("gcs", "azure"):
        backend = _backend(kind, request)
        missing = type(backend.location)("no-such-bucket-7f3a", "p", backend.location.scheme)
        backend.location = missing
        if kind == "gcs":
            backend._bucket = backend._client.bucket(missing.bucket)  # type: ignore[attr-defined]
        else:
            backend._container = backend._service.get_container_client(missing.bucket)  # type: ignore[attr-defined]
        with pytest.raises(StoreError) as exc:
            BlobCheckpointStore(backend, RUN).list_committed()
        assert "no-such-bucket-7f3a" in str(exc.value), str(exc.value)


def test_the_blob_store_sets_what_the_s3_store_sets(gcs_server: Any) -> None:
    """Every attribute ObjectStore.__init__ sets, BlobCheckpointStore sets too."""
    import boto3

    s3 = CheckpointStore(
        boto3.client("s3", region_name="us-east-1"), parse_any_remote("s3://bkt/p"), RUN
    )
    from daemon.storage.gcs import GcsBackend

    blob = BlobCheckpointStore(GcsBackend(parse_blob_remote("gs://bkt/p")), RUN)
    assert set(vars(s3)) <= set(vars(blob))


def test_remote_urls_parse_to_their_scheme() -> None:
    assert parse_any_remote("gs://bkt/a/b/").url("k") == "gs://bkt/k"
    assert parse_any_remote("az://ctr").url("k") == "az://ctr/k"
    assert parse_any_remote("s3://bkt/p").url("k") == "s3://bkt/k"
    for bad in ("gs://Bkt/p", "az://c--t/p", "gs://bkt/a//b", "az://ctr/p?x"):
        with pytest.raises(ValueError):
            parse_any_remote(bad)


def test_azure_without_credentials_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.storage.azure_blob import AzureBackend

    for name in (
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_ACCOUNT_URL",
        "AZURE_STORAGE_ACCOUNT",
    ):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StoreError) as exc:
        AzureBackend(parse_blob_remote("az://ctr/p"))
    assert exc.value.code == "NoCredentials" and "AZURE_STORAGE_CONNECTION_STRING" in str(exc.value)
