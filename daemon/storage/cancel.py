"""The cancel switch: one throw stops every upload through one client, at once and for good.

Thrown at the notice deadline less the safety margin (see :class:`CancelSwitch`). Whether
an exception comes from it is :func:`daemon.storage.errors.is_cancellation`'s to say.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import structlog
from s3transfer.futures import BaseTransferFuture

from daemon.storage.errors import UploadCancelled

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

# Requests that write: refused once uploads are cancelled. Aborts, deletes, listings and
# reads still go through, so a cancelled upload can clean up after itself.
_WRITE_OPERATIONS = (
    "PutObject",
    "UploadPart",
    "CreateMultipartUpload",
    "CompleteMultipartUpload",
    "CopyObject",
    "UploadPartCopy",
)


class CancelSwitch:
    """One switch that stops every upload through one client, at once and for good.

    Thrown when the notice deadline (less the safety margin) comes: every tracked
    transfer future is cancelled (s3transfer then aborts its multipart upload), parts
    being sent stop at their next read, and any further write request through the
    client fails before it is sent, so no manifest can be written after the switch.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._futures: set[BaseTransferFuture] = set()
        self.reason = ""

    def install(self, client: S3Client) -> None:
        """Refuse write requests through ``client`` once the switch is thrown."""
        for op in _WRITE_OPERATIONS:
            client.meta.events.register(f"before-send.s3.{op}", self._before_send)

    def _before_send(self, **_kwargs: Any) -> None:
        # Raised inside botocore's send: not a transient error, so it is not retried.
        if self._event.is_set():
            raise UploadCancelled(f"upload cancelled: {self.reason}")

    @property
    def cancelled(self) -> bool:
        """Whether the switch has been thrown."""
        return self._event.is_set()

    def check(self, what: str) -> None:
        """Raise :class:`UploadCancelled` (naming ``what``) when the switch is thrown."""
        if self._event.is_set():
            raise UploadCancelled(f"{what}: upload cancelled ({self.reason})")

    def track(self, future: BaseTransferFuture) -> None:
        """Cancel ``future`` with the others (at once, if already thrown)."""
        with self._lock:
            self._futures.add(future)
            thrown = self._event.is_set()
        if thrown:
            future.cancel()

    def untrack(self, future: BaseTransferFuture) -> None:
        with self._lock:
            self._futures.discard(future)

    def cancel(self, reason: str) -> int:
        """Throw the switch; the number of transfers it cancelled."""
        with self._lock:
            if self._event.is_set():
                return 0
            self.reason = reason
            self._event.set()
            futures = list(self._futures)
        for f in futures:
            if not f.done():
                f.cancel()
        log.warning("uploads_cancelled", reason=reason, transfers=len(futures))
        return len(futures)
