"""Checkpoints on Google Cloud Storage (``gs://``) and Azure Blob Storage (``az://``): the
same store, the same layers, another service underneath.

The seam is :class:`~daemon.storage.blob.BlobBackend` (:mod:`daemon.storage.blob`): the
dozen object operations every layer of :class:`~daemon.storage.store.CheckpointStore`
needs, in the terms both services share. :mod:`daemon.storage.gcs` and
:mod:`daemon.storage.azure_blob` implement it.

:class:`BlobCheckpointStore` is the S3 store with exactly the methods that speak S3
overridden to go through a backend; commit order, verification, listing, retention,
restore, the global commit and the leases are the same code for every service. The S3
path is not touched: an S3 store never reaches this module. The file ends of its
transfers (a file read to be sent, a part written as it is read back) are in
:mod:`daemon.storage.blob_io`.

How "does the server hold our bytes" (CONTRACT §5) maps: on S3 the ETag is the MD5 of the
bytes (or of the parts' MD5s). Here a listed object's ``etag`` is the hex MD5 the
service keeps for the whole object: GCS computes ``md5Hash`` itself and the client
checks it at the end of every upload; Azure verifies each staged block against its
transactional MD5 and keeps the whole-file MD5 we computed while sending as the blob's
``Content-MD5``. Either way the commit compares it with the MD5 of the bytes we read to
send, and reads the object back when they differ (or when the service kept none).

The interface, the locations and the values it passes are re-exported here, where
callers have always imported them.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn, cast

import structlog

from daemon.layout import FileEntry
from daemon.storage.blob import BlobBackend, BlobObject, Got, chunked, hex_md5
from daemon.storage.blob_io import SendReader, Transfer, fetch_part, open_resolving
from daemon.storage.cancel import CancelSwitch
from daemon.storage.download import _Part
from daemon.storage.errors import StoreError, UploadCancelled
from daemon.storage.etags import EtagDigest, normalize_etag
from daemon.storage.integrity import BY_ETAG, BY_READ_BACK
from daemon.storage.locations import (
    BLOB_SCHEMES,
    BlobLocation,
    RemoteObject,
    is_blob_remote,
    parse_any_remote,
    parse_blob_remote,
)
from daemon.storage.records import _RUN_ID_RE, CHECKPOINTS_DIR
from daemon.storage.s3client import RenameTolerantOSUtils, make_transfer_config
from daemon.storage.store import CheckpointStore

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from daemon.config import Config

log = structlog.get_logger(__name__)


class _NoS3Client:
    """Stands where the S3 layers keep their boto3 client. Every method of theirs that
    talks to S3 is overridden by :class:`BlobCheckpointStore`; one that is not fails
    here, loudly, instead of sending S3 requests to GCS or Azure."""

    def __init__(self, location: BlobLocation) -> None:
        self._location = location

    def __getattr__(self, name: str) -> NoReturn:
        raise StoreError(
            f"{self._location.url()}: internal error: the S3 client's {name!r} was used on a"
            f" {self._location.scheme}:// store (a storage layer method lacks its override"
            " in daemon.storage.backend)",
            "Internal",
        )


class BlobCheckpointStore(CheckpointStore):
    """:class:`CheckpointStore` on a :class:`BlobBackend` (GCS or Azure).

    Overridden, and only these: the object primitives of
    :mod:`~daemon.storage.objects` (``_list``, ``_get_object``, ``read_small``,
    ``write_small``, ``_delete_key``), the uploads of :mod:`~daemon.storage.transfers`
    (``_submit`` and what it hands on), the verification reads and writes of
    :mod:`~daemon.storage.verify` (``_head``, ``_verify_stored``, ``_read_whole``,
    ``_write_checked``), the deletions of :mod:`~daemon.storage.retention`
    (``_abort_unfinished``, ``_delete_objects``), ``copy_file`` of
    :mod:`~daemon.storage.commit` and ``_part_fetcher`` of :mod:`~daemon.storage.restore`.
    """

    def __init__(
        self,
        backend: BlobBackend,
        run_id: str,
        *,
        part_size: int = 64 * 1024 * 1024,
        max_concurrency: int = 8,
    ) -> None:
        # Everything ObjectStore.__init__ sets, without an S3 client
        # (tests/test_blob_store.py checks that the two set the same attributes).
        if not _RUN_ID_RE.match(run_id):
            raise ValueError(f"run id {run_id!r} does not match [A-Za-z0-9._-]{{1,128}}")
        location = backend.location
        self.backend = backend
        self.client = cast("S3Client", _NoS3Client(location))
        self.location = location
        self.run_id = run_id
        # Read by the layers for the part size and concurrency only.
        self.transfer_config = make_transfer_config(part_size, max_concurrency)
        self._checksum_algorithm = None
        self._checkpoints_prefix = location.key(run_id, CHECKPOINTS_DIR) + "/"
        self._crt = False
        self.node_id = None
        # Not installed on a client: uploads read it at every piece (see SendReader).
        self._switch = CancelSwitch()
        self._resolvers = []
        self._osutil = RenameTolerantOSUtils(self._resolve_path)
        self._watching = {}
        self._tms = {}
        self._tm_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._max_concurrency = max(1, max_concurrency)

    # -- objects ------------------------------------------------------------------------

    def _list(self, prefix: str) -> list[RemoteObject]:
        return list(self.backend.list(prefix))

    def _get_object(
        self, key: str, *, missing_ok: bool, max_bytes: int
    ) -> tuple[bytes, dict[str, str]] | None:
        got = self.backend.get(key, max_bytes=max_bytes)
        if got is None:
            if missing_ok:
                return None
            raise StoreError(f"read {self.location.url(key)}: object does not exist", "NoSuchKey")
        return got.data, got.metadata

    def read_small(self, key: str, max_bytes: int = 64 * 1024) -> tuple[bytes, str] | None:
        """A small object's bytes and version (GCS generation, Azure ETag); None when it
        does not exist. The version is what :meth:`write_small`'s ``if_match`` takes."""
        got = self.backend.get(key, max_bytes=max_bytes)
        return None if got is None else (got.data, got.version)

    def write_small(
        self, key: str, body: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Write a small object conditionally (``ifGenerationMatch`` on GCS, 0 for create;
        ``If-Match``/``If-None-Match: *`` on Azure); its new version. A lost condition
        raises :class:`StoreError` with code ``PreconditionFailed``."""
        return self.backend.put(
            key,
            body,
            content_type="application/json",
            metadata={},
            if_version=if_match,
            if_absent=if_none_match,
        )

    def _delete_key(self, key: str) -> None:
        self.backend.delete(key)

    # -- uploads --------------------------------------------------------------------------

    def etag_digest(self, size: int, *, in_order: bool = True) -> EtagDigest:
        """The whole-object MD5 both services keep (no parts in it), fed in any order."""
        return EtagDigest(size, None)

    @property
    def whole_md5_etags(self) -> bool:
        """Both services keep the MD5 of the whole object, however it was uploaded."""
        return True

    def etag_checkable(self, size: int, *, staged: bool = False) -> bool:
        return True

    def upload_args(self, sha256: str | None) -> dict[str, Any]:
        return {"Metadata": {"sha256": sha256}} if sha256 else {}

    def _executor(self) -> ThreadPoolExecutor:
        with self._tm_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self._max_concurrency, thread_name_prefix="blob-upload"
                )
            return self._pool

    def _submit(
        self, path: Path, key: str, sha256: str | None, digest: EtagDigest | None, staged: bool
    ) -> Any:
        """One file to the upload pool; a future (``done``, ``cancel``, ``result``) to give
        to :meth:`wait_upload`. ``digest`` is fed with the bytes as they are read to be sent."""
        transfer = Transfer()
        transfer.future = self._executor().submit(
            self._upload_one, transfer, Path(path), key, sha256, digest
        )
        return transfer

    def _upload_one(
        self,
        transfer: Transfer,
        path: Path,
        key: str,
        sha256: str | None,
        digest: EtagDigest | None,
    ) -> str:
        def cancelled() -> str | None:
            if self._switch.cancelled:
                return self._switch.reason or "cancelled"
            return "cancelled" if transfer.cancelled.is_set() else None

        url = self.location.url(key)
        if cancelled() is not None:
            raise UploadCancelled(f"upload {url}: upload cancelled ({cancelled()})")
        with open_resolving(path, self._resolve_path) as f:
            size = os.fstat(f.fileno()).st_size
            reader = SendReader(f, digest, cancelled, url)
            metadata = {"sha256": sha256} if sha256 else {}
            return self.backend.upload_file(cast("IO[bytes]", reader), key, size, metadata)

    def _release(self, future: Any) -> None:
        """Nothing to release: a blob upload holds no shared transfer state."""

    def wait_upload(self, future: Any, key: str, size: int | None = None) -> None:
        """Wait for one submitted upload; its failure as :class:`StoreError` (a blob
        upload has no separate completing request: ``size`` is not needed)."""
        url = self.location.url(key)
        try:
            future.result()
        except FileNotFoundError:
            raise
        except StoreError:
            raise
        except CancelledError:
            raise UploadCancelled(f"upload {url}: upload cancelled") from None
        except OSError as exc:
            raise StoreError(f"upload {url}: {exc.strerror or exc}", "OSError") from exc

    def close(self) -> None:
        """Wait for uploads in flight (not once cancelled: they stop at their next read),
        then release the backend's connections."""
        with self._tm_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=not self._switch.cancelled, cancel_futures=self._switch.cancelled)
        self.backend.close()

    # -- verification ----------------------------------------------------------------------

    def _head(self, key: str) -> dict[str, Any]:
        obj = self.backend.head(key)
        if obj is None:
            raise StoreError(f"head {self.location.url(key)}: object does not exist", "NoSuchKey")
        return {"ETag": obj.etag}

    def _verify_stored(
        self, key: str, fields: Mapping[str, Any], md5_etag: str, sha256: str
    ) -> str | None:
        """Its MD5 as the service keeps it, else its bytes read back (see the module)."""
        etag = normalize_etag(str(fields.get("ETag") or ""))
        if etag and etag == normalize_etag(md5_etag):
            return BY_ETAG
        return BY_READ_BACK if self._read_back_sha256(key) == sha256 else None

    def _read_whole(self, key: str, sink: Callable[[bytes], None]) -> None:
        self.backend.read_range(key, None, 0, None, sink)

    def _write_checked(
        self, key: str, body: bytes, content_type: str, metadata: dict[str, str], create: bool
    ) -> None:
        # One request whose MD5 the service checks on arrival (GCS md5Hash, Azure
        # Content-MD5): bytes that arrive other than sent are refused, never stored.
        self._switch.check(f"write {self.location.url(key)}")
        self.backend.put(key, body, content_type=content_type, metadata=metadata, if_absent=create)

    # -- deletions ------------------------------------------------------------------------

    def _abort_unfinished(
        self, prefix: str, keys: Collection[str] | None, older_than: float | None
    ) -> tuple[int, str | None]:
        """Nothing to abort on these services: an unfinished GCS resumable upload or Azure
        staged blocks never become an object, cannot be listed as one, and are discarded
        by the service itself (after a week)."""
        return 0, f"{self.backend.location.scheme}:// keeps no listable unfinished uploads"

    def _delete_objects(self, prefix: str, keys: list[str]) -> None:
        """One delete per object (neither service deletes in batches), in parallel."""
        workers = min(len(keys), self._max_concurrency)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delete") as pool:
            for _ in pool.map(self._delete_key, keys):
                pass

    # -- copies and restore -----------------------------------------------------------------

    def copy_file(self, src: RemoteObject, key: str, entry: FileEntry) -> bool:
        """Copy one unchanged file server-side; False (upload it instead) when the source
        is gone or changed."""
        self._switch.check(f"copy {self.location.url(key)}")
        source = src if isinstance(src, BlobObject) else BlobObject(src.key, src.size, src.etag)
        if not self.backend.copy(source, key):
            log.info("copy_source_gone", key=key, source=src.key, code="PreconditionFailed")
            return False
        log.info("file_copied", key=key, source=src.key, bytes=entry.size)
        return True

    def _part_fetcher(self) -> Callable[[_Part], str | None]:
        """Parts read through the backend, pinned to the listed version (see
        :func:`~daemon.storage.blob_io.fetch_part`)."""
        return functools.partial(fetch_part, self.backend)


def build_blob_store(cfg: Config, *, max_concurrency: int | None = None) -> BlobCheckpointStore:
    """The store for a ``gs://`` or ``az://`` ``checkpoints.remote``. Part size and
    concurrency come from ``s3.part_size_mb`` and ``s3.max_concurrency`` (or
    ``max_concurrency``: 1 for a store of small writes, such as the run ledger's)."""
    location = parse_blob_remote(cfg.checkpoints.remote)
    part_size = cfg.s3.part_size_mb * 1024 * 1024
    concurrency = max_concurrency or cfg.s3.max_concurrency
    backend: BlobBackend
    if location.scheme == "gs":
        from daemon.storage.gcs import GcsBackend

        backend = GcsBackend(location, part_size=part_size, max_connections=2 * concurrency + 2)
    else:
        from daemon.storage.azure_blob import AzureBackend

        backend = AzureBackend(
            location,
            part_size=part_size,
            account_url=cfg.azure.account_url,
            max_connections=2 * concurrency + 2,
        )
    return BlobCheckpointStore(
        backend, cfg.run.id, part_size=part_size, max_concurrency=concurrency
    )


__all__ = [
    "BLOB_SCHEMES",
    "BlobBackend",
    "BlobCheckpointStore",
    "BlobLocation",
    "BlobObject",
    "Got",
    "build_blob_store",
    "chunked",
    "hex_md5",
    "is_blob_remote",
    "parse_any_remote",
    "parse_blob_remote",
]
