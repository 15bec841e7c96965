"""Checkpoints on Google Cloud Storage (``gs://``) and Azure Blob Storage (``az://``): the
same store, the same layers, another service underneath.

The seam is :class:`BlobBackend`: the dozen object operations every layer of
:class:`~daemon.storage.store.CheckpointStore` needs, in the terms both services share:
list with sizes, MD5s and times; read a small object with its *version* (GCS
generation, Azure ETag); conditional create and conditional replace on that version;
delete; server-side copy pinned to the source's version; a ranged read pinned the same
way; a file upload in verified pieces (GCS resumable upload, Azure staged blocks).
:mod:`daemon.storage.gcs` and :mod:`daemon.storage.azure_blob` implement it.

:class:`BlobCheckpointStore` is the S3 store with exactly the methods that speak S3
overridden to go through a backend; commit order, verification, listing, retention,
restore, the global commit and the leases are the same code for every service. The S3
path is not touched: an S3 store never reaches this module.

How "does the server hold our bytes" (CONTRACT §5) maps: on S3 the ETag is the MD5 of the
bytes (or of the parts' MD5s). Here a listed object's ``etag`` is the hex MD5 the
service keeps for the whole object: GCS computes ``md5Hash`` itself and the client
checks it at the end of every upload; Azure verifies each staged block against its
transactional MD5 and keeps the whole-file MD5 we computed while sending as the blob's
``Content-MD5``. Either way the commit compares it with the MD5 of the bytes we read to
send, and reads the object back when they differ (or when the service kept none).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn, Protocol, cast

import structlog

from daemon.layout import MANIFEST_NAME, FileEntry
from daemon.storage.download import _Part, download_checkpoint
from daemon.storage.records import _RUN_ID_RE, CHECKPOINTS_DIR, RemoteCheckpoint
from daemon.storage.s3client import (
    BY_ETAG,
    BY_READ_BACK,
    CancelSwitch,
    EtagDigest,
    IntegrityError,
    RemoteLocation,
    RemoteObject,
    RenameTolerantOSUtils,
    StoreError,
    UploadCancelled,
    make_transfer_config,
    normalize_etag,
    parse_remote,
)
from daemon.storage.store import CheckpointStore

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from daemon.config import Config

log = structlog.get_logger(__name__)

BLOB_SCHEMES = ("gs", "az")
# Transient failures worth another try of one ranged read (the SDKs retry requests, not a
# body that breaks off half-way).
_RETRY_CODES = frozenset({"Unreachable", "Timeout", "Throttled", "ServerError"})
_READ_ATTEMPTS = 3

# The same rules as daemon.config._remote (tests/test_config.py checks they agree).
_GCS_BUCKET_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{1,220})[a-z0-9]$")
_AZURE_CONTAINER_RE = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class BlobLocation(RemoteLocation):
    """A bucket (GCS) or container (Azure) and a key prefix, named by its URL scheme."""

    scheme: str = "gs"

    def url(self, key: str = "") -> str:
        """``gs://bucket/key`` or ``az://container/key`` for messages."""
        return f"{self.scheme}://{self.bucket}/{key}"


@dataclass(frozen=True)
class BlobObject(RemoteObject):
    """A listed object. ``etag`` is the hex MD5 of its bytes as the service keeps it (""
    when it keeps none); ``version`` pins this exact object: the GCS generation or the
    Azure ETag, used for conditional reads, copies and replaces."""

    version: str = field(default="", compare=False)


@dataclass(frozen=True)
class Got:
    """A small object read whole."""

    data: bytes
    metadata: dict[str, str]
    version: str


class BlobBackend(Protocol):
    """One bucket or container. Every failure is a :class:`StoreError` whose message names
    the object (``location.url(key)``) and whose ``code`` is one of ``NoSuchKey``,
    ``NoSuchBucket``, ``PreconditionFailed``, ``AccessDenied``, ``NoCredentials``,
    ``Throttled``, ``ServerError``, ``Unreachable``, ``Timeout``, ``Cancelled``; bytes that
    are not what they should be are an :class:`IntegrityError`."""

    location: BlobLocation

    def list(self, prefix: str) -> list[BlobObject]:
        """Every object under ``prefix``, with size, MD5, version and time."""
        ...

    def head(self, key: str) -> BlobObject | None:
        """One object's properties (None when it does not exist)."""
        ...

    def get(self, key: str, *, max_bytes: int) -> Got | None:
        """A small object whole (None when it does not exist); IntegrityError past
        ``max_bytes``, which is never read."""
        ...

    def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str],
        if_version: str | None = None,
        if_absent: bool = False,
    ) -> str:
        """Write a small object in one request whose MD5 the service verifies; its new
        version. ``if_absent``: only if nothing is there (create); ``if_version``: only if
        the object is still that version (replace). A lost condition is ``PreconditionFailed``."""
        ...

    def upload_file(
        self, reader: IO[bytes], key: str, size: int, metadata: Mapping[str, str]
    ) -> str:
        """Send ``size`` bytes from ``reader`` (read in order; it raises
        :class:`UploadCancelled` once cancelled) as one object, in verified pieces; the
        hex MD5 the service holds for it afterwards ("" if it keeps none)."""
        ...

    def read_range(
        self,
        key: str,
        version: str | None,
        start: int,
        length: int | None,
        sink: Callable[[bytes], None],
    ) -> None:
        """Feed ``sink`` the bytes ``start .. start+length`` (None: to the end), in order.
        ``version``: only that version of the object; IntegrityError when it is gone or
        was replaced since it was listed."""
        ...

    def copy(self, src: BlobObject, dst_key: str) -> bool:
        """Server-side copy of ``src`` (pinned to its version); False when the source is
        gone or changed (upload instead)."""
        ...

    def delete(self, key: str) -> None:
        """Delete one object; one that is already gone is fine."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def parse_blob_remote(value: str) -> BlobLocation:
    """Parse ``gs://bucket[/prefix]`` or ``az://container[/prefix]``; ValueError naming the
    value when it is not one."""
    m = re.match(r"^(gs|az)://([^/]*)(?:/(.*))?$", value or "", re.DOTALL)
    if not m or not m[2]:
        raise ValueError(f"remote {value!r} is not gs://bucket[/prefix] or az://container[/prefix]")
    scheme, bucket, prefix = m[1], m[2], m[3] or ""
    if scheme == "gs" and (
        not _GCS_BUCKET_RE.match(bucket)
        or (len(bucket) > 63 and "." not in bucket)
        or any(len(part) > 63 for part in bucket.split("."))
    ):
        raise ValueError(f"remote {value!r}: {bucket!r} is not a valid GCS bucket name")
    if scheme == "az" and not _AZURE_CONTAINER_RE.match(bucket):
        raise ValueError(f"remote {value!r}: {bucket!r} is not a valid Azure container name")
    if any(c in value for c in "?#") or any(ch.isspace() for ch in value):
        raise ValueError(f"remote {value!r} contains characters not allowed in a key prefix")
    prefix = prefix.strip("/")
    if "//" in prefix:
        raise ValueError(f"remote {value!r} has an empty path segment in its prefix")
    return BlobLocation(bucket, prefix, scheme)


def parse_any_remote(value: str) -> RemoteLocation:
    """``s3://`` (:func:`~daemon.storage.s3client.parse_remote`), ``gs://`` or ``az://``."""
    if isinstance(value, str) and value.startswith(tuple(f"{s}://" for s in BLOB_SCHEMES)):
        return parse_blob_remote(value)
    return parse_remote(value)


def is_blob_remote(value: str) -> bool:
    """Whether ``checkpoints.remote`` names GCS or Azure (not S3)."""
    return value.startswith(tuple(f"{s}://" for s in BLOB_SCHEMES))


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


class _Transfer:
    """One file upload: a future the pipeline and the commit can wait on or cancel.

    ``cancel()`` also stops an upload already sending, at its next read (a plain
    :class:`concurrent.futures.Future` cannot be cancelled once it runs)."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.future: Future[str] | None = None

    def done(self) -> bool:
        return self.future is not None and self.future.done()

    def cancel(self) -> bool:
        self.cancelled.set()
        return self.future.cancel() if self.future is not None else True

    def result(self, timeout: float | None = None) -> str:
        assert self.future is not None
        return self.future.result(timeout)


class _SendReader:
    """The file as the backend reads it to send: feeds the expected-MD5 digest by offset
    (a retried piece read again is hashed once) and stops the upload once cancelled."""

    def __init__(
        self,
        f: IO[bytes],
        digest: EtagDigest | None,
        cancelled: Callable[[], str | None],
        what: str,
    ) -> None:
        self._f = f
        self._digest = digest
        self._cancelled = cancelled
        self._what = what
        self._pos = 0

    def _check(self) -> None:
        why = self._cancelled()
        if why is not None:
            raise UploadCancelled(f"upload {self._what}: upload cancelled ({why})")

    def read(self, amount: int | None = -1) -> bytes:
        self._check()
        data = self._f.read(-1 if amount is None else amount)
        if self._digest is not None and data:
            self._digest.feed(self._pos, data)
        self._pos += len(data)
        return data

    def seek(self, where: int, whence: int = 0) -> int:
        self._pos = self._f.seek(where, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()


def _open_resolving(path: Path, resolve: Callable[[str], str]) -> IO[bytes]:
    """Open a file at its current path: a staged file's ``.tmp-`` directory may have been
    renamed into place since it was submitted (the open fd survives later renames)."""
    try:
        return open(path, "rb")  # closed by the upload
    except FileNotFoundError:
        moved = resolve(str(path))
        if moved == str(path):
            raise
        return open(moved, "rb")  # closed by the upload


class BlobCheckpointStore(CheckpointStore):
    """:class:`CheckpointStore` on a :class:`BlobBackend` (GCS or Azure).

    Overridden, and only these: the object primitives of
    :mod:`~daemon.storage.objects` (``_list``, ``_get_object``, ``read_small``,
    ``write_small``, ``_delete_key``), the uploads of :mod:`~daemon.storage.transfers`,
    the verification reads and writes of :mod:`~daemon.storage.verify`, the deletions of
    :mod:`~daemon.storage.retention`, ``copy_file`` of :mod:`~daemon.storage.commit` and
    ``_download`` of :mod:`~daemon.storage.restore`.
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
        # Not installed on a client: uploads read it at every piece (see _SendReader).
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

    def start_upload(
        self,
        path: Path,
        key: str,
        sha256: str | None,
        digest: EtagDigest | None = None,
        *,
        staged: bool = False,
    ) -> Any:
        """Submit one file; a future (``done``, ``cancel``, ``result``) to give to
        :meth:`wait_upload`. ``digest`` is fed with the bytes as they are read to be sent."""
        self._switch.check(f"upload {self.location.url(key)}")
        transfer = _Transfer()
        transfer.future = self._executor().submit(
            self._upload_one, transfer, Path(path), key, sha256, digest
        )
        return transfer

    def _upload_one(
        self,
        transfer: _Transfer,
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
        with _open_resolving(path, self._resolve_path) as f:
            size = os.fstat(f.fileno()).st_size
            reader = _SendReader(f, digest, cancelled, url)
            metadata = {"sha256": sha256} if sha256 else {}
            return self.backend.upload_file(cast("IO[bytes]", reader), key, size, metadata)

    def _release(self, future: Any) -> None:
        """Nothing to release: a blob upload holds no shared transfer state."""

    def wait_upload(self, future: Any, key: str) -> None:
        """Wait for one submitted upload; its failure as :class:`StoreError`."""
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

    def _read_back_sha256(self, key: str) -> str:
        return self._read_back(key)[0]

    def _read_back(self, key: str, *, md5: bool = False) -> tuple[str, str | None]:
        """The sha256 (and with ``md5``, the MD5) of the object's bytes as served; stopped
        by the cancel switch, since no manifest may follow it then."""
        what = f"verify {self.location.url(key)}"
        h = hashlib.sha256()
        m = hashlib.md5(usedforsecurity=False) if md5 else None

        def sink(chunk: bytes) -> None:
            self._switch.check(what)
            h.update(chunk)
            if m is not None:
                m.update(chunk)

        self.backend.read_range(key, None, 0, None, sink)
        return h.hexdigest(), m.hexdigest() if m is not None else None

    def _put_bytes(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
        if_none_match: bool = False,
    ) -> None:
        # One request whose MD5 the service checks on arrival (GCS md5Hash, Azure
        # Content-MD5): bytes that arrive other than sent are refused, never stored.
        self._switch.check(f"write {self.location.url(key)}")
        sha = hashlib.sha256(body).hexdigest()
        self.backend.put(
            key,
            body,
            content_type=content_type,
            metadata={"sha256": sha, **(metadata or {})},
            if_absent=if_none_match,
        )

    # -- deletions ------------------------------------------------------------------------

    def abort_incomplete_uploads(
        self,
        prefix: str | None = None,
        *,
        keys: Collection[str] | None = None,
        older_than: float | None = None,
    ) -> int:
        """Nothing to abort on these services: an unfinished GCS resumable upload or Azure
        staged blocks never become an object, cannot be listed as one, and are discarded
        by the service itself (after a week). Logged like an S3 abort, with 0."""
        prefix = prefix if prefix is not None else self.location.key(self.run_id) + "/"
        log.info(
            "multipart_uploads_aborted",
            prefix=prefix,
            aborted=0,
            why=f"{self.backend.location.scheme}:// keeps no listable unfinished uploads",
            **({"older_than_s": older_than} if older_than is not None else {}),
        )
        return 0

    def delete_checkpoint(self, step: int) -> None:
        """Delete one remote checkpoint: the manifest first (uncommit), then its files."""
        self._delete_key(self.file_key(step, MANIFEST_NAME))
        keys = [o.key for o in self._list(self.step_prefix(step))]
        if keys:
            workers = min(len(keys), self._max_concurrency)
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delete") as pool:
                for _ in pool.map(self._delete_key, keys):
                    pass
        log.info("checkpoint_deleted", step=step, objects=len(keys))

    def check_writable(self) -> None:
        """Preflight: put and delete a small probe object under the run's prefix."""
        key = self.location.key(self.run_id, f".spot-supervisor-probe-{os.urandom(4).hex()}")
        self._put_bytes(key, b"probe\n", content_type="text/plain")
        self._delete_key(key)
        log.info("store_writable", bucket=self.location.bucket, key=key)

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

    def _download(self, remote: RemoteCheckpoint, local_dir: Path) -> Path:
        return download_checkpoint(
            self.client,
            self.location,
            remote.manifest,
            remote.manifest_raw,
            remote.objects,
            local_dir,
            part_size=self.transfer_config.multipart_chunksize,
            max_concurrency=self.transfer_config.max_request_concurrency,
            fetch=self._fetch_part,
        )

    def _fetch_part(self, part: _Part) -> str | None:
        """Read one part into its partial file, pinned to the listed version; the sha256
        when it is the whole file. A read that breaks off is tried again."""
        obj = part.obj
        url = self.location.url(obj.key)
        version = obj.version if isinstance(obj, BlobObject) and obj.version else None
        last: StoreError | None = None
        for attempt in range(_READ_ATTEMPTS):
            writer = _PartWriter(part, url)
            try:
                self.backend.read_range(obj.key, version, part.start, part.length, writer.write)
            except StoreError as exc:
                if exc.code in _RETRY_CODES and not isinstance(exc, IntegrityError):
                    last = exc
                    log.info("download_retry", key=obj.key, start=part.start, error=str(exc))
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise
            finally:
                writer.close()
            got = writer.offset - part.start
            if got != part.length:
                raise IntegrityError(f"{url}: got {got} bytes, the manifest says {part.length}")
            if part.hasher is not None:
                part.hasher.part_done(part.start, part.length)
            return writer.sha256()
        assert last is not None
        raise last


class _PartWriter:
    """Bytes of one part, in order, into its place in the partial file (hashed when the
    part is the whole file)."""

    def __init__(self, part: _Part, url: str) -> None:
        self._part = part
        self._url = url
        self._limit = part.start + part.length
        self._h = hashlib.sha256() if part.whole else None
        self._fd = os.open(part.partial, os.O_WRONLY)
        self.offset = part.start

    def write(self, chunk: bytes) -> None:
        if self.offset + len(chunk) > self._limit:
            raise IntegrityError(
                f"{self._url} has more bytes than the {self._part.entry.size} listed"
            )
        view = memoryview(chunk)
        while view:
            n = os.pwrite(self._fd, view, self.offset)
            self.offset += n
            view = view[n:]
        if self._h is not None:
            self._h.update(chunk)

    def sha256(self) -> str | None:
        return self._h.hexdigest() if self._h is not None else None

    def close(self) -> None:
        os.close(self._fd)


def hex_md5(raw: bytes | bytearray | None) -> str:
    """A binary MD5 (Azure's ``content_md5``, GCS's decoded ``md5Hash``) as hex; "" for none."""
    return bytes(raw).hex() if raw else ""


def chunked(reader: IO[bytes], size: int, piece: int) -> Iterable[bytes]:
    """``size`` bytes of ``reader`` in pieces of ``piece`` bytes (the last one shorter)."""
    left = size
    while left > 0:
        data = reader.read(min(piece, left))
        if not data:
            raise StoreError(f"file ended {left} bytes early while it was being sent", "OSError")
        left -= len(data)
        yield data


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
