"""Uploads through s3transfer (or CRT): transfer managers, upload arguments, ETag digests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import CancelledError

from daemon.storage.errors import UploadCancelled, describe_error
from daemon.storage.etags import EtagDigest, multipart_part_size
from daemon.storage.integrity import endpoint_integrity
from daemon.storage.objects import ObjectStore
from daemon.storage.s3client import make_transfer_manager

log = structlog.get_logger(__name__)

# How long a failed CompleteMultipartUpload may still turn out done. Completing a large
# object can outlast even the complete's own read timeout ("could take several minutes",
# AWS says; a loaded stand-in took up to 25 s for 256 MiB; see
# daemon.storage.s3client.COMPLETE_READ_TIMEOUT); botocore then sends it again, and the
# retry finds the upload taken (404 NoSuchUpload on AWS, 500 on moto) while the first one
# is still assembling the object.
COMPLETE_WAIT = 30.0


class TransferLayer(ObjectStore):
    """Uploads through s3transfer (or CRT): transfer managers, upload arguments, ETag digests."""

    @property
    def transfer_manager(self) -> Any:
        """The transfer manager of complete files (its concurrency is shared by their uploads)."""
        return self._manager(self._crt)

    def _manager(self, crt: bool) -> Any:
        with self._tm_lock:
            tm = self._tms.get(crt)
            if tm is None:
                tm = self._tms[crt] = make_transfer_manager(
                    self.client, self.transfer_config, crt=crt, osutil=self._osutil
                )
            return tm

    def _uses_crt(self, staged: bool) -> bool:
        """Whether an upload goes through the CRT client.

        Never for a staged file: it lives in a writer's ``.tmp-`` directory, which is
        renamed into place while the file is being sent. The classic manager reopens it
        under its new name (:class:`RenameTolerantOSUtils`); the CRT client reads the
        path natively, part by part, and would fail in the middle of the upload.
        """
        return self._crt and not staged

    def close(self) -> None:
        """Shut the transfer managers down (waiting for what is in flight)."""
        with self._tm_lock:
            tms, self._tms = list(self._tms.values()), {}
        for tm in tms:
            tm.shutdown(cancel=self._switch.cancelled)

    def upload_args(self, sha256: str | None) -> dict[str, Any]:
        """Extra arguments of every file upload: our sha256 (when known before it is
        sent), and the server-side checksum."""
        extra: dict[str, Any] = {"Metadata": {"sha256": sha256}} if sha256 else {}
        if self._checksum_algorithm:
            extra["ChecksumAlgorithm"] = self._checksum_algorithm
        return extra

    def etag_digest(self, size: int, *, in_order: bool = True) -> EtagDigest:
        """A digest of the ETag a file of ``size`` bytes gets from this store's uploads.

        ``in_order``: the digest will be fed the bytes in order (one reading pass), so on
        an endpoint known to give multipart objects their whole MD5 as ETag (see
        :class:`~daemon.storage.integrity.EndpointIntegrity`) it predicts that one. Fed by
        offset from concurrent part reads, it always predicts AWS's convention.
        """
        part = multipart_part_size(self.transfer_config, size)
        if part is not None and in_order and self.whole_md5_etags:
            part = None  # one MD5 over every byte: the endpoint's own convention
        return EtagDigest(size, part)

    @property
    def whole_md5_etags(self) -> bool:
        """Whether this endpoint gives multipart objects their whole MD5 as ETag."""
        return endpoint_integrity(str(self.client.meta.endpoint_url)).multipart_whole_md5

    def etag_checkable(self, size: int, *, staged: bool = False) -> bool:
        """Whether we know the part boundaries of an upload of ``size`` bytes.

        The classic transfer manager's we know (s3transfer's own rule); the CRT client
        splits files its own way, so its multipart ETags are not checked (AWS S3, the
        only endpoint it is used with, verifies the additional checksum itself).
        ``staged``: a file of a checkpoint still being written (see :meth:`_uses_crt`).
        """
        return not self._uses_crt(staged) or multipart_part_size(self.transfer_config, size) is None

    def start_upload(
        self,
        path: Path,
        key: str,
        sha256: str | None,
        digest: EtagDigest | None = None,
        *,
        staged: bool = False,
    ) -> Any:
        """Submit one file to the transfer manager; its future, cancelled with the switch.

        ``digest`` (classic transfer manager only) is fed with the bytes as they are read
        to be sent: its :meth:`~daemon.storage.etags.EtagDigest.etag` is then the ETag the
        object must have, at no extra read. ``staged``: a file of a checkpoint still
        being written, always sent by the classic manager (see :meth:`_uses_crt`).
        """
        self._switch.check(f"upload {self.location.url(key)}")
        return self._submit(path, key, sha256, digest, staged)

    def _submit(
        self, path: Path, key: str, sha256: str | None, digest: EtagDigest | None, staged: bool
    ) -> Any:
        """Hand one file to the transfer manager (see :meth:`start_upload`); its future."""
        crt = self._uses_crt(staged)
        watch = digest is not None and not crt
        if watch and digest is not None:
            self._osutil.watch(str(path), digest)
        try:
            future = self._manager(crt).upload(
                str(path), self.location.bucket, key, extra_args=self.upload_args(sha256)
            )
        except BaseException:
            if watch:
                self._osutil.unwatch(str(path))
            raise
        if watch:
            with self._tm_lock:
                self._watching[id(future)] = str(path)
        self._switch.track(future)
        return future

    def _release(self, future: Any) -> None:
        self._switch.untrack(future)
        with self._tm_lock:
            path = self._watching.pop(id(future), None)
        if path is not None:
            self._osutil.unwatch(path)

    def wait_upload(self, future: Any, key: str, size: int | None = None) -> None:
        """Wait for one submitted upload; its failure as :class:`StoreError`.

        A failure of the upload's last request, CompleteMultipartUpload, is not yet a
        failed upload: when the key holds an object of ``size`` bytes within
        :data:`COMPLETE_WAIT` seconds, the first attempt completed it (see there). Its
        bytes are then checked like any upload's, by the commit's ETag check."""
        try:
            future.result()
        except FileNotFoundError:
            raise
        except (ClientError, BotoCoreError) as exc:
            if (
                _completing(exc)
                and size is not None
                and self.stored_within(key, size, COMPLETE_WAIT)
            ):
                log.info("upload_completed_on_retry", key=key, error=str(exc))
                return
            raise describe_error(exc, action="upload", location=self.location, key=key) from exc
        except (OSError, CancelledError, UploadCancelled) as exc:
            raise describe_error(exc, action="upload", location=self.location, key=key) from exc
        finally:
            self._release(future)

    def stored_within(self, key: str, size: int, wait: float) -> bool:
        """Whether ``key`` holds an object of ``size`` bytes within ``wait`` seconds (the
        cancel switch ends the wait)."""
        end = time.monotonic() + wait
        while True:
            try:
                head = self.client.head_object(Bucket=self.location.bucket, Key=key)
                if int(head.get("ContentLength", -1)) == size:
                    return True
            except (ClientError, BotoCoreError):
                pass
            if time.monotonic() >= end or self._switch.cancelled:
                return False
            time.sleep(0.5)


def _completing(exc: ClientError | BotoCoreError) -> bool:
    """Whether ``exc`` failed a CompleteMultipartUpload: named by a ClientError, or, for a
    timeout, by its URL (``?uploadId=`` without ``partNumber=``: not a part's)."""
    if isinstance(exc, ClientError):
        return exc.operation_name == "CompleteMultipartUpload"
    url = str(getattr(exc, "kwargs", {}).get("endpoint_url", ""))
    return "uploadId=" in url and "partNumber=" not in url
