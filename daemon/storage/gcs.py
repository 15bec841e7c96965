"""Google Cloud Storage behind :class:`~daemon.storage.blob.BlobBackend` (``gs://``).

Credentials are the environment's (Application Default Credentials: the instance's
service account on GCE, ``GOOGLE_APPLICATION_CREDENTIALS`` elsewhere);
``STORAGE_EMULATOR_HOST`` points the client at an emulator, anonymously. The
google-cloud-storage package is the ``gcp`` extra, imported only for a ``gs://`` remote.

- **Versions** are generations. A conditional create is ``ifGenerationMatch=0``; a
  conditional replace ``ifGenerationMatch=<generation>``; reads and copies of a listed
  object name its generation, so an object replaced since the listing is never read as
  if it were the listed one.
- **Uploads**: small objects in one multipart request carrying their MD5, which GCS
  verifies; files larger than a part go as a resumable upload in ``part_size`` chunks,
  whose MD5 the client compares with GCS's ``md5Hash`` when the upload completes (and
  deletes the object when they differ). Either way the listing's ``md5Hash`` is then the
  MD5 GCS computed over what it stored.
- **Copies** are ``rewrite`` calls (repeated with their token until done), pinned with
  ``ifSourceGenerationMatch``; a rewrite keeps ``md5Hash``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping
from typing import IO, Any

import structlog

from daemon.storage.blob import BlobObject, Got, get_pinned, hex_md5
from daemon.storage.errors import (
    IntegrityError,
    StoreError,
    already_described,
)
from daemon.storage.locations import BlobLocation
from daemon.storage.records import _too_large
from daemon.storage.s3client import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT

log = structlog.get_logger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_TIMEOUT = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT)


def _md5_hex(b64: str | None) -> str:
    return hex_md5(base64.b64decode(b64)) if b64 else ""


def _gcs() -> Any:
    try:
        from google.cloud import storage
    except ImportError:
        raise StoreError(
            "gs:// remotes need google-cloud-storage: pip install 'spot-supervisor[gcp]'",
            "MissingDependency",
        ) from None
    return storage


class _Sink:
    """A write-only file for the client's downloads: every chunk to ``sink``, in order."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class GcsBackend:
    """One GCS bucket. See the module for what each operation relies on."""

    def __init__(
        self,
        location: BlobLocation,
        *,
        part_size: int = 64 * 1024 * 1024,
        max_connections: int = 18,
        client: Any = None,
    ) -> None:
        storage = _gcs()
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.location = location
        # Resumable chunks must be a multiple of 256 KiB (part sizes are whole MiB).
        self._chunk = max(256 * 1024, part_size - part_size % (256 * 1024))
        self._part_size = part_size
        try:
            self._client = client if client is not None else storage.Client()
        except Exception as exc:
            raise self._error(exc, "connect", None) from exc
        if client is None:
            self._widen_pool(max_connections)
        self._bucket = self._client.bucket(location.bucket)
        # Every request we make may be repeated: object names are written again only with
        # the same bytes (checkpoint files) or under a precondition (leases, commits).
        self._retry = DEFAULT_RETRY.with_timeout(60.0)

    def _widen_pool(self, size: int) -> None:
        # One connection per concurrent upload, as for S3 (requests keeps 10 by default).
        import requests.adapters

        http = getattr(self._client, "_http", None)
        if http is not None and hasattr(http, "mount"):
            adapter = requests.adapters.HTTPAdapter(pool_connections=size, pool_maxsize=size)
            http.mount("https://", adapter)
            http.mount("http://", adapter)

    # -- errors -----------------------------------------------------------------------------

    def _error(self, exc: BaseException, action: str, key: str | None) -> StoreError:
        """A :class:`StoreError` for a failed call: one line naming the object and the cause."""
        from google.api_core import exceptions as gexc

        what = self.location.url(key) if key is not None else f"bucket {self.location.bucket!r}"
        known = already_described(exc, action, what)
        if known is not None:
            return known
        name = type(exc).__name__
        if name == "DataCorruption":
            return IntegrityError(f"{action} {what}: GCS holds other bytes than were sent ({exc})")
        if name in ("DefaultCredentialsError", "RefreshError"):
            return StoreError(
                f"{action} {what}: no usable Google credentials ({exc}); on GCE give the"
                " instance a service account, elsewhere set GOOGLE_APPLICATION_CREDENTIALS",
                "NoCredentials",
            )
        if isinstance(exc, gexc.PreconditionFailed):
            return StoreError(
                f"{action} {what}: precondition failed (changed meanwhile)", "PreconditionFailed"
            )
        if isinstance(exc, gexc.NotFound):
            if "bucket" in str(exc).lower() and "object" not in str(exc).lower():
                return StoreError(
                    f"{action} {what}: bucket {self.location.bucket!r} does not exist",
                    "NoSuchBucket",
                )
            return StoreError(f"{action} {what}: object does not exist", "NoSuchKey")
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
            return StoreError(
                f"{action} {what}: access denied (the service account needs"
                f" roles/storage.objectAdmin on bucket {self.location.bucket!r})",
                "AccessDenied",
            )
        if isinstance(exc, gexc.TooManyRequests):
            return StoreError(f"{action} {what}: throttled by GCS after retries", "Throttled")
        if isinstance(exc, gexc.ServerError):
            return StoreError(
                f"{action} {what}: GCS answered {exc.code}: {exc.message}", "ServerError"
            )
        if isinstance(exc, gexc.GoogleAPICallError):
            return StoreError(f"{action} {what}: HTTP {exc.code}: {exc.message}", name)
        if isinstance(exc, gexc.RetryError):
            return StoreError(f"{action} {what}: gave up after retries ({exc.cause})", "Timeout")
        import requests

        if isinstance(exc, requests.exceptions.Timeout):
            return StoreError(f"{action} {what}: timed out waiting for GCS", "Timeout")
        if isinstance(exc, requests.exceptions.ConnectionError):
            return StoreError(f"{action} {what}: cannot reach GCS ({exc})", "Unreachable")
        if isinstance(exc, OSError):
            return StoreError(f"{action} {what}: {exc.strerror or exc}", "OSError")
        return StoreError(f"{action} {what}: {name}: {exc}", name)

    def _object(self, blob: Any) -> BlobObject:
        updated = blob.updated
        return BlobObject(
            blob.name,
            int(blob.size or 0),
            _md5_hex(blob.md5_hash),
            updated.timestamp() if updated is not None else None,
            version=str(blob.generation or ""),
        )

    # -- BlobBackend ------------------------------------------------------------------------

    def list(self, prefix: str) -> list[BlobObject]:
        try:
            blobs = self._client.list_blobs(
                self._bucket,
                prefix=prefix,
                fields="items(name,size,md5Hash,generation,updated),nextPageToken",
                timeout=_TIMEOUT,
                retry=self._retry,
            )
            return [self._object(b) for b in blobs]
        except Exception as exc:
            raise self._error(exc, "list", prefix) from exc

    def head(self, key: str) -> BlobObject | None:
        try:
            blob = self._bucket.get_blob(key, timeout=_TIMEOUT, retry=self._retry)
        except Exception as exc:
            raise self._error(exc, "head", key) from exc
        return None if blob is None else self._object(blob)

    def get(self, key: str, *, max_bytes: int) -> Got | None:
        url = self.location.url(key)

        def read() -> Got | None:
            blob = self._bucket.get_blob(key, timeout=_TIMEOUT, retry=self._retry)
            if blob is None:
                return None
            if int(blob.size or 0) > max_bytes:
                raise IntegrityError(_too_large(url, blob.size, max_bytes))
            pinned = self._bucket.blob(key, generation=blob.generation)
            data = pinned.download_as_bytes(
                raw_download=True, checksum=None, timeout=_TIMEOUT, retry=self._retry
            )
            return Got(data, dict(blob.metadata or {}), str(blob.generation))

        # The generation read is pinned: replaced meanwhile, it is gone (NoSuchKey).
        return get_pinned(url, max_bytes, read, lambda e: self._error(e, "read", key), "NoSuchKey")

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
        blob = self._bucket.blob(key)
        blob.metadata = dict(metadata) or None
        match = 0 if if_absent else (int(if_version) if if_version is not None else None)
        try:
            # checksum="md5": the request carries md5Hash and GCS refuses other bytes.
            blob.upload_from_string(
                body,
                content_type=content_type,
                if_generation_match=match,
                checksum="md5",
                timeout=_TIMEOUT,
                retry=self._retry,
            )
        except Exception as exc:
            raise self._error(exc, "write", key) from exc
        return str(blob.generation)

    def upload_file(
        self, reader: IO[bytes], key: str, size: int, metadata: Mapping[str, str]
    ) -> str:
        blob = self._bucket.blob(key, chunk_size=self._chunk)
        blob.metadata = dict(metadata) or None
        try:
            blob.upload_from_file(
                reader,
                size=size,
                content_type="application/octet-stream",
                checksum="md5",
                timeout=(DEFAULT_CONNECT_TIMEOUT, max(DEFAULT_READ_TIMEOUT, 60.0)),
                retry=self._retry,
            )
        except Exception as exc:
            raise self._error(exc, "upload", key) from exc
        return _md5_hex(blob.md5_hash)

    def read_range(
        self,
        key: str,
        version: str | None,
        start: int,
        length: int | None,
        sink: Callable[[bytes], None],
    ) -> None:
        if length == 0:
            return
        blob = self._bucket.blob(key, generation=int(version) if version else None)
        end = None if length is None else start + length - 1
        try:
            blob.download_to_file(
                _Sink(sink),
                start=start if (start or end is not None) else None,
                end=end,
                raw_download=True,
                checksum=None,  # we hash every byte against the manifest ourselves
                timeout=_TIMEOUT,
                retry=self._retry,
            )
        except Exception as exc:
            err = self._error(exc, "download", key)
            if version and err.code in ("NoSuchKey", "PreconditionFailed"):
                raise IntegrityError(
                    f"download {self.location.url(key)}: generation {version} is gone"
                    " (replaced or deleted since it was listed)"
                ) from exc
            if err.code == "NoSuchKey":
                raise IntegrityError(str(err)) from exc
            raise err from exc

    def copy(self, src: BlobObject, dst_key: str) -> bool:
        source = self._bucket.blob(src.key)
        dest = self._bucket.blob(dst_key)
        token: str | None = None
        try:
            while True:
                token, _done, _total = dest.rewrite(
                    source,
                    token=token,
                    if_source_generation_match=int(src.version) if src.version else None,
                    timeout=_TIMEOUT,
                    retry=self._retry,
                )
                if token is None:
                    return True
        except Exception as exc:
            err = self._error(exc, "copy", dst_key)
            if err.code in ("NoSuchKey", "PreconditionFailed"):
                return False
            raise err from exc

    def delete(self, key: str) -> None:
        try:
            self._bucket.blob(key).delete(timeout=_TIMEOUT, retry=self._retry)
        except Exception as exc:
            err = self._error(exc, "delete", key)
            if err.code != "NoSuchKey":
                raise err from exc

    def close(self) -> None:
        http = getattr(self._client, "_http", None)
        if http is not None and hasattr(http, "close"):
            http.close()


def emulator_host() -> str | None:
    """The emulator the client will talk to (``STORAGE_EMULATOR_HOST``), if any."""
    return os.environ.get(EMULATOR_ENV) or None
