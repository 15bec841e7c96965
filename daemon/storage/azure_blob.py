"""Azure Blob Storage behind :class:`~daemon.storage.blob.BlobBackend` (``az://``).

``az://container/prefix`` names a container; the storage account comes from
``AZURE_STORAGE_CONNECTION_STRING`` (account and key, or an emulator's endpoint), else
from ``azure.account_url`` (or ``AZURE_STORAGE_ACCOUNT_URL``, or
``AZURE_STORAGE_ACCOUNT``) with ``DefaultAzureCredential`` (a managed identity on an
Azure VM). The azure-storage-blob and azure-identity packages are the ``azure`` extra,
imported only for an ``az://`` remote.

- **Versions** are ETags. A conditional create is ``If-None-Match: *``; a conditional
  replace ``If-Match: <etag>``; reads and copies of a listed object name its ETag.
- **Uploads**: a file up to one part is one Put Blob with ``Content-MD5``, which Azure
  verifies and keeps. A larger file is staged in ``part_size`` blocks, each with its
  transactional MD5 (Azure refuses a block whose bytes do not match), then committed as
  a block list whose ``Content-MD5`` is the whole file's MD5 as we read it to send.
  Blocks never committed are invisible and discarded by Azure after a week.
- **Copies** are Copy Blob within the account, pinned with ``x-ms-source-if-match``;
  the copy keeps ``Content-MD5``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

import structlog

from daemon.storage.blob import BlobObject, Got, chunked, get_pinned, hex_md5
from daemon.storage.errors import (
    IntegrityError,
    StoreError,
    already_described,
)
from daemon.storage.locations import BlobLocation
from daemon.storage.records import _too_large
from daemon.storage.s3client import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT

log = structlog.get_logger(__name__)

CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
ACCOUNT_URL_ENV = "AZURE_STORAGE_ACCOUNT_URL"
ACCOUNT_ENV = "AZURE_STORAGE_ACCOUNT"
# A copy within one account is usually done when Copy Blob answers; a pending one is
# polled this long before it counts as failed (and the file is uploaded instead).
COPY_WAIT_S = 60.0
_PRECONDITION_CODES = frozenset(
    {"ConditionNotMet", "BlobAlreadyExists", "SourceConditionNotMet", "TargetConditionNotMet"}
)


def _azure() -> Any:
    try:
        from azure.storage import blob
    except ImportError:
        raise StoreError(
            "az:// remotes need azure-storage-blob: pip install 'spot-supervisor[azure]'",
            "MissingDependency",
        ) from None
    return blob


def service_client(account_url: str | None = None, *, max_connections: int = 18) -> Any:
    """A BlobServiceClient from the environment (see the module); StoreError naming what
    is missing when there are no credentials to be had."""
    blob = _azure()
    import requests
    from azure.core.pipeline.transport import RequestsTransport

    # One connection per concurrent upload, as for S3 (requests keeps 10 by default).
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(
        pool_connections=max_connections, pool_maxsize=max_connections
    )
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    options: dict[str, Any] = {
        "connection_timeout": DEFAULT_CONNECT_TIMEOUT,
        "read_timeout": DEFAULT_READ_TIMEOUT,
        "retry_total": 4,
        "transport": RequestsTransport(session=session, session_owner=True),
    }
    conn = os.environ.get(CONNECTION_STRING_ENV)
    if conn:
        try:
            return blob.BlobServiceClient.from_connection_string(conn, **options)
        except ValueError as exc:
            raise StoreError(
                f"{CONNECTION_STRING_ENV} is not a connection string: {exc}", "NoCredentials"
            ) from None
    url = account_url or os.environ.get(ACCOUNT_URL_ENV)
    if not url and os.environ.get(ACCOUNT_ENV):
        url = f"https://{os.environ[ACCOUNT_ENV]}.blob.core.windows.net"
    if not url:
        raise StoreError(
            "az:// remote: no storage account: set AZURE_STORAGE_CONNECTION_STRING, or"
            " azure.account_url (https://<account>.blob.core.windows.net) for"
            " DefaultAzureCredential",
            "NoCredentials",
        )
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise StoreError(
            "az:// without a connection string needs azure-identity (DefaultAzureCredential):"
            " pip install 'spot-supervisor[azure]'",
            "MissingDependency",
        ) from None
    return blob.BlobServiceClient(url, credential=DefaultAzureCredential(), **options)


class AzureBackend:
    """One Azure container. See the module for what each operation relies on."""

    def __init__(
        self,
        location: BlobLocation,
        *,
        part_size: int = 64 * 1024 * 1024,
        account_url: str | None = None,
        max_connections: int = 18,
        service: Any = None,
    ) -> None:
        self._blob = _azure()
        from azure.core import MatchConditions

        self._match = MatchConditions
        self.location = location
        # Azure takes blocks of up to 4000 MiB; our parts are 5 MiB to 5 GiB.
        self._part_size = min(part_size, 4000 * 1024 * 1024)
        self._service = (
            service
            if service is not None
            else service_client(account_url, max_connections=max_connections)
        )
        self._container = self._service.get_container_client(location.bucket)

    # -- errors -----------------------------------------------------------------------------

    def _error(self, exc: BaseException, action: str, key: str | None) -> StoreError:
        """A :class:`StoreError` for a failed call: one line naming the object and the cause."""
        from azure.core import exceptions as aexc

        what = self.location.url(key) if key is not None else f"container {self.location.bucket!r}"
        known = already_described(exc, action, what)
        if known is not None:
            return known
        status = getattr(exc, "status_code", None)
        if isinstance(exc, aexc.ClientAuthenticationError) and status in (None, 401):
            return StoreError(
                f"{action} {what}: no usable Azure credentials ({exc.message})", "NoCredentials"
            )
        if isinstance(exc, aexc.HttpResponseError):
            status = exc.status_code or 0
            code = str(getattr(exc, "error_code", "") or "")
            code = code.split(".")[-1] if code.startswith("StorageErrorCode.") else code
            if code == "ContainerNotFound":
                return StoreError(
                    f"{action} {what}: container {self.location.bucket!r} does not exist",
                    "NoSuchBucket",
                )
            if status == 412 or code in _PRECONDITION_CODES:
                return StoreError(
                    f"{action} {what}: precondition failed (changed meanwhile)",
                    "PreconditionFailed",
                )
            if status == 404:
                return StoreError(f"{action} {what}: object does not exist", "NoSuchKey")
            if status == 403:
                return StoreError(
                    f"{action} {what}: access denied (the identity needs Storage Blob Data"
                    f" Contributor on container {self.location.bucket!r}; {code or status})",
                    "AccessDenied",
                )
            if code == "Md5Mismatch" or (status == 400 and "md5" in str(exc).lower()):
                return IntegrityError(f"{action} {what}: Azure refused the bytes: MD5 mismatch")
            if status in (429, 503) or code in ("ServerBusy", "OperationTimedOut"):
                return StoreError(
                    f"{action} {what}: throttled by Azure ({code or status}) after retries",
                    "Throttled",
                )
            if status >= 500:
                return StoreError(
                    f"{action} {what}: Azure answered {status} {code}".rstrip(), "ServerError"
                )
            return StoreError(f"{action} {what}: HTTP {status} {code}".rstrip(), code or None)
        if isinstance(exc, aexc.ServiceRequestError):
            return StoreError(f"{action} {what}: cannot reach Azure ({exc.message})", "Unreachable")
        if isinstance(exc, aexc.ServiceResponseError):
            return StoreError(f"{action} {what}: no answer from Azure ({exc.message})", "Timeout")
        if isinstance(exc, aexc.AzureError):
            return StoreError(
                f"{action} {what}: {type(exc).__name__}: {exc.message}", type(exc).__name__
            )
        if isinstance(exc, OSError):
            return StoreError(f"{action} {what}: {exc.strerror or exc}", "OSError")
        return StoreError(f"{action} {what}: {type(exc).__name__}: {exc}", type(exc).__name__)

    @staticmethod
    def _object(props: Any) -> BlobObject:
        modified = props.last_modified
        settings = props.content_settings
        return BlobObject(
            props.name,
            int(props.size or 0),
            hex_md5(settings.content_md5 if settings is not None else None),
            modified.timestamp() if modified is not None else None,
            version=str(props.etag or ""),
        )

    def _client(self, key: str) -> Any:
        return self._container.get_blob_client(key)

    # -- BlobBackend ------------------------------------------------------------------------

    def list(self, prefix: str) -> list[BlobObject]:
        try:
            return [self._object(p) for p in self._container.list_blobs(name_starts_with=prefix)]
        except Exception as exc:
            raise self._error(exc, "list", prefix) from exc

    def head(self, key: str) -> BlobObject | None:
        try:
            return self._object(self._client(key).get_blob_properties())
        except Exception as exc:
            err = self._error(exc, "head", key)
            if err.code == "NoSuchKey":
                return None
            raise err from exc

    def get(self, key: str, *, max_bytes: int) -> Got | None:
        bc, url = self._client(key), self.location.url(key)

        def read() -> Got | None:
            props = bc.get_blob_properties()
            if int(props.size or 0) > max_bytes:
                raise IntegrityError(_too_large(url, props.size, max_bytes))
            data = bc.download_blob(
                etag=props.etag, match_condition=self._match.IfNotModified, max_concurrency=1
            ).readall()
            return Got(bytes(data), dict(props.metadata or {}), str(props.etag))

        # A blob replaced since its properties were read fails the If-Match.
        return get_pinned(
            url, max_bytes, read, lambda e: self._error(e, "read", key), "PreconditionFailed"
        )

    def _conditions(self, if_version: str | None, if_absent: bool) -> dict[str, Any]:
        if if_absent:
            return {"match_condition": self._match.IfMissing}
        if if_version is not None:
            return {"etag": if_version, "match_condition": self._match.IfNotModified}
        return {}

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
        try:
            # validate_content: Content-MD5 on the request; Azure refuses other bytes.
            resp = self._client(key).upload_blob(
                body,
                overwrite=True,
                metadata=dict(metadata) or None,
                content_settings=self._blob.ContentSettings(content_type=content_type),
                validate_content=True,
                **self._conditions(if_version, if_absent),
            )
        except Exception as exc:
            raise self._error(exc, "write", key) from exc
        return str(resp["etag"])

    def upload_file(
        self, reader: IO[bytes], key: str, size: int, metadata: Mapping[str, str]
    ) -> str:
        bc = self._client(key)
        settings = self._blob.ContentSettings(content_type="application/octet-stream")
        try:
            if size <= self._part_size:
                data = reader.read(size)
                if len(data) != size:
                    raise StoreError(
                        f"upload {self.location.url(key)}: the file changed size while it was sent",
                        "OSError",
                    )
                bc.upload_blob(
                    data,
                    overwrite=True,
                    metadata=dict(metadata) or None,
                    content_settings=settings,
                    validate_content=True,
                )
                return hashlib.md5(data, usedforsecurity=False).hexdigest()
            md5 = hashlib.md5(usedforsecurity=False)
            blocks = []
            for i, piece in enumerate(chunked(reader, size, self._part_size)):
                # Block ids of one blob must all have the same length.
                block_id = base64.b64encode(f"block-{i:08d}".encode()).decode()
                bc.stage_block(block_id, piece, validate_content=True)
                md5.update(piece)
                blocks.append(self._blob.BlobBlock(block_id=block_id))
            settings.content_md5 = bytearray(md5.digest())
            bc.commit_block_list(blocks, content_settings=settings, metadata=dict(metadata) or None)
            return md5.hexdigest()
        except Exception as exc:
            raise self._error(exc, "upload", key) from exc

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
        kwargs: dict[str, Any] = {"max_concurrency": 1}
        if version:
            kwargs.update(etag=version, match_condition=self._match.IfNotModified)
        if start or length is not None:
            kwargs.update(offset=start, length=length)
        try:
            for chunk in self._client(key).download_blob(**kwargs).chunks():
                sink(bytes(chunk))
        except (StoreError, OSError):
            raise
        except Exception as exc:
            err = self._error(exc, "download", key)
            if err.code in ("NoSuchKey", "PreconditionFailed"):
                raise IntegrityError(
                    f"download {self.location.url(key)}: gone or replaced since it was listed"
                ) from exc
            raise err from exc

    def copy(self, src: BlobObject, dst_key: str) -> bool:
        source = self._client(src.key)
        dest = self._client(dst_key)
        kwargs: dict[str, Any] = {}
        if src.version:
            kwargs.update(source_etag=src.version, source_match_condition=self._match.IfNotModified)
        try:
            status = dest.start_copy_from_url(source.url, **kwargs).get("copy_status")
            deadline = time.monotonic() + COPY_WAIT_S
            while status == "pending" and time.monotonic() < deadline:
                time.sleep(0.2)
                status = dest.get_blob_properties().copy.status
        except Exception as exc:
            err = self._error(exc, "copy", dst_key)
            if err.code in ("NoSuchKey", "PreconditionFailed") or "CannotVerifyCopySource" in str(
                exc
            ):
                return False
            raise err from exc
        if status != "success":
            log.warning("copy_not_finished", key=dst_key, source=src.key, status=status)
            return False
        return True

    def delete(self, key: str) -> None:
        try:
            self._client(key).delete_blob()
        except Exception as exc:
            err = self._error(exc, "delete", key)
            if err.code != "NoSuchKey":
                raise err from exc

    def close(self) -> None:
        self._service.close()
