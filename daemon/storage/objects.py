"""Keys, requests and small objects: the base every storage layer stands on."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from daemon.layout import (
    step_dir_name,
)
from daemon.storage.cancel import CancelSwitch
from daemon.storage.errors import IntegrityError, describe_error
from daemon.storage.etags import normalize_etag
from daemon.storage.locations import RemoteLocation, RemoteObject
from daemon.storage.records import (
    _RUN_ID_RE,
    _SHA256_VERIFIED,
    CHECKPOINTS_DIR,
    COMPLETE_NAME,
    VERIFIED_META,
    T,
    _too_large,
)
from daemon.storage.s3client import (
    DEFAULT_CHECKSUM_ALGORITHM,
    RenameTolerantOSUtils,
    make_transfer_config,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import PutObjectOutputTypeDef

log = structlog.get_logger(__name__)


class ObjectStore:
    """Keys, requests and small objects: the base every storage layer stands on."""

    def __init__(
        self,
        client: S3Client,
        location: RemoteLocation,
        run_id: str,
        transfer_config: TransferConfig | None = None,
        *,
        checksum_algorithm: str | None = DEFAULT_CHECKSUM_ALGORITHM,
        crt: bool = False,
    ) -> None:
        """``checksum_algorithm`` (``CRC32``, ``SHA256``, ``CRC32C``; see
        :func:`daemon.storage.s3client.checksum_algorithm`) asks the server to verify each
        upload on arrival too (None for S3-compatible servers that reject
        ``x-amz-checksum-*`` headers; build the client with ``request_checksums=False``
        then). ``crt`` uploads through the CRT client (see
        :func:`daemon.storage.s3client.use_crt`)."""
        if not _RUN_ID_RE.match(run_id):
            raise ValueError(f"run id {run_id!r} does not match [A-Za-z0-9._-]{{1,128}}")
        self.client = client
        self.location = location
        self.run_id = run_id
        self.transfer_config = transfer_config or make_transfer_config()
        self._checksum_algorithm = checksum_algorithm
        self._checkpoints_prefix = location.key(run_id, CHECKPOINTS_DIR) + "/"
        self._crt = crt
        # Set for a multi-node run (run.nodes > 1): this node's name in part keys.
        self.node_id: str | None = None
        self._switch = CancelSwitch()
        self._switch.install(client)
        self._resolvers: list[Callable[[str], str]] = []
        self._osutil = RenameTolerantOSUtils(self._resolve_path)
        self._watching: dict[int, str] = {}  # id(transfer future) -> watched filename
        self._tms: dict[bool, Any] = {}  # crt? -> transfer manager
        self._tm_lock = threading.Lock()

    def step_prefix(self, step: int) -> str:
        """``<prefix>/<run_id>/checkpoints/step-<9 digits>/``."""
        return self._checkpoints_prefix + step_dir_name(step) + "/"

    def file_key(self, step: int, path: str) -> str:
        """The key of one file (or of ``manifest.json``) of a checkpoint."""
        return self.step_prefix(step) + path

    @property
    def complete_key(self) -> str:
        """``<prefix>/<run_id>/complete.json``."""
        return self.location.key(self.run_id, COMPLETE_NAME)

    @property
    def cancel_switch(self) -> CancelSwitch:
        """Thrown once, at the notice deadline less the margin: every upload stops."""
        return self._switch

    def _call(self, action: str, key: str | None, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            raise describe_error(exc, action=action, location=self.location, key=key) from exc

    def _put_object(
        self, key: str, body: bytes, content_type: str, **extra: Any
    ) -> PutObjectOutputTypeDef:
        """One PutObject of ``body`` (``extra``: metadata, conditions, checksum); its
        response fields."""
        return self._call(
            "write",
            key,
            lambda: self.client.put_object(
                Bucket=self.location.bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
                **extra,
            ),
        )

    def _list(self, prefix: str) -> list[RemoteObject]:
        def run() -> list[RemoteObject]:
            paginator = self.client.get_paginator("list_objects_v2")
            found = []
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                for o in page.get("Contents", []):
                    modified = o.get("LastModified")
                    found.append(
                        RemoteObject(
                            o["Key"],
                            o["Size"],
                            o.get("ETag", ""),
                            modified.timestamp() if modified is not None else None,
                        )
                    )
            return found

        return self._call("list", prefix, run)

    def _step_objects(self, step: int) -> dict[str, RemoteObject]:
        prefix = self.step_prefix(step)
        return {o.key[len(prefix) :]: o for o in self._list(prefix)}

    def _get_bytes(self, key: str, *, missing_ok: bool, max_bytes: int) -> bytes | None:
        got = self._get_object(key, missing_ok=missing_ok, max_bytes=max_bytes)
        return None if got is None else got[0]

    def _get_object(
        self, key: str, *, missing_ok: bool, max_bytes: int
    ) -> tuple[bytes, dict[str, str]] | None:
        """A small object's bytes and metadata; :class:`IntegrityError` past ``max_bytes``.

        Anyone who can write to the bucket can make an object of any size: it is never
        read past ``max_bytes`` (the body is closed unread when the length says so).
        """
        url = self.location.url(key)
        try:
            resp = self.client.get_object(Bucket=self.location.bucket, Key=key)
            body = resp["Body"]
            try:
                length = int(resp.get("ContentLength", 0))
                if length > max_bytes:
                    raise IntegrityError(_too_large(url, length, max_bytes))
                data = body.read(max_bytes + 1)
                if len(data) > max_bytes:  # the length header said less
                    raise IntegrityError(_too_large(url, None, max_bytes))
            finally:
                body.close()
            return data, dict(resp.get("Metadata", {}))
        except (ClientError, BotoCoreError) as exc:
            err = describe_error(exc, action="read", location=self.location, key=key)
            if missing_ok and err.code == "NoSuchKey":
                return None
            raise err from exc

    def step_objects(self, step: int) -> dict[str, RemoteObject]:
        """Every object of one step, by its path within the step."""
        return self._step_objects(step)

    def get_object(self, key: str, *, max_bytes: int) -> tuple[bytes, dict[str, str]] | None:
        """A small object's bytes and metadata (None when it is gone)."""
        return self._get_object(key, missing_ok=True, max_bytes=max_bytes)

    @staticmethod
    def metadata_says_verified(metadata: Mapping[str, str]) -> bool:
        """Whether a manifest's (or part's) metadata says its files passed our sha256."""
        return metadata.get(VERIFIED_META, _SHA256_VERIFIED) == _SHA256_VERIFIED

    def list_objects(self, prefix: str) -> list[RemoteObject]:
        """Every object under ``prefix`` (one paginated listing)."""
        return self._list(prefix)

    def read_small(self, key: str, max_bytes: int = 64 * 1024) -> tuple[bytes, str] | None:
        """A small object's bytes and ETag; None when it does not exist."""

        def run() -> tuple[bytes, str] | None:
            try:
                resp = self.client.get_object(Bucket=self.location.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            body = resp["Body"].read(max_bytes + 1)
            if len(body) > max_bytes:
                raise IntegrityError(_too_large(self.location.url(key), None, max_bytes))
            return body, normalize_etag(str(resp.get("ETag", "")))

        return self._call("read", key, run)

    def write_small(
        self, key: str, body: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Write a small object conditionally; its new ETag. A lost condition raises
        :class:`StoreError` with code ``PreconditionFailed``."""
        extra: dict[str, Any] = {}
        if if_match is not None:
            extra["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        resp = self._put_object(key, body, "application/json", **extra)
        return normalize_etag(str(resp.get("ETag", "")))

    def _delete_key(self, key: str) -> None:
        """Delete one object (gone already is fine): the one delete the layers above make
        outside a method a non-S3 store overrides (see :mod:`daemon.storage.backend`)."""
        self._call(
            "delete",
            key,
            lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key),
        )

    def add_path_resolver(self, resolve: Callable[[str], str]) -> None:
        """Let uploads find a file whose directory was renamed while it was being sent."""
        self._resolvers.append(resolve)

    def _resolve_path(self, path: str) -> str:
        for resolve in self._resolvers:
            moved = resolve(path)
            if moved != path:
                return moved
        return path
