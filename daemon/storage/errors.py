"""Storage failures, each one line naming the bucket and key and saying what went wrong.

Errors from botocore are turned into :class:`StoreError` here (:func:`describe_error`),
because that line is what an operator reads in the journal. :class:`UploadCancelled`
(the cancel switch was thrown) and :class:`IntegrityError` (bytes that are not what a
manifest says) are its subclasses. The GCS and Azure backends raise the same family.

What must not live here: retries or any request (the callers decide those).
"""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from s3transfer.exceptions import CancelledError

from daemon.storage.locations import RemoteLocation

_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)


class StoreError(RuntimeError):
    """An object-storage operation failed; ``str()`` is one line naming bucket/key and cause.

    ``code`` is the S3 error code (``NoSuchKey``, ``AccessDenied``, ...) or one of
    ``Unreachable``, ``Timeout``, ``NoCredentials``, ``Integrity`` when there is none.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class UploadCancelled(StoreError):
    """An upload was cancelled (the notice deadline is near); nothing was committed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "Cancelled")


class IntegrityError(StoreError):
    """Stored bytes do not match what a manifest says (missing, wrong size, wrong sha256)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "Integrity")


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` (possibly wrapped by botocore) comes from a :class:`CancelSwitch`."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (UploadCancelled, CancelledError)):
            return True
        inner = getattr(cur, "kwargs", {}).get("error") if hasattr(cur, "kwargs") else None
        cur = inner if isinstance(inner, BaseException) else (cur.__cause__ or cur.__context__)
    return False


def already_described(exc: BaseException, action: str, what: str) -> StoreError | None:
    """``exc`` itself when it is a :class:`StoreError` already, an :class:`UploadCancelled`
    naming ``what`` when it comes from the cancel switch (wrapped or not); None for any
    other failure, which the service's own rules describe (:func:`describe_error` for
    S3, the backends' for GCS and Azure)."""
    if isinstance(exc, StoreError):
        return exc
    if is_cancellation(exc):
        return UploadCancelled(f"{action} {what}: upload cancelled")
    return None


def _client_error_code(exc: ClientError) -> tuple[str, str, int]:
    err = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    code = str(err.get("Code") or status or "Unknown")
    message = str(err.get("Message") or "").strip()
    # HEAD responses carry no body, so S3 reports only the status as the code.
    if code == "404":
        code = "NotFound"
    elif code == "403":
        code = "AccessDenied"
    return code, message, status


def describe_error(
    exc: BaseException, *, action: str, location: RemoteLocation, key: str | None = None
) -> StoreError:
    """A :class:`StoreError` for a failed S3 call: one line, naming the object and the cause.

    ``action`` says what we were doing (``upload``, ``list``, ...); ``key`` is the object,
    or None when the call was about the bucket or a prefix.
    """
    what = location.url(key) if key is not None else f"bucket {location.bucket!r}"
    known = already_described(exc, action, what)
    if known is not None:
        return known
    if isinstance(exc, ClientError):
        code, message, status = _client_error_code(exc)
        if code == "NoSuchBucket":
            return StoreError(f"{action} {what}: bucket {location.bucket!r} does not exist", code)
        if code in ("NoSuchKey", "NotFound"):
            return StoreError(f"{action} {what}: object does not exist", "NoSuchKey")
        if code == "AccessDenied" or status == 403:
            return StoreError(
                f"{action} {what}: access denied (check the role's S3 permissions"
                f" on bucket {location.bucket!r})",
                "AccessDenied",
            )
        if code in _CREDENTIAL_CODES:
            return StoreError(f"{action} {what}: credentials rejected ({code})", code)
        if code in _THROTTLE_CODES or status == 503:
            return StoreError(
                f"{action} {what}: throttled by S3 ({code}) after retries", "Throttled"
            )
        if code == "PreconditionFailed":
            return StoreError(f"{action} {what}: object changed during the transfer", code)
        detail = f": {message}" if message else ""
        return StoreError(f"{action} {what}: {code}{detail}", code)
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError)):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "the S3 endpoint")
        return StoreError(f"{action} {what}: cannot reach {endpoint}", "Unreachable")
    if isinstance(exc, ReadTimeoutError):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "the S3 endpoint")
        return StoreError(f"{action} {what}: timed out waiting for {endpoint}", "Timeout")
    if isinstance(exc, NoCredentialsError):
        return StoreError(f"{action} {what}: no AWS credentials found", "NoCredentials")
    if isinstance(exc, BotoCoreError):
        return StoreError(f"{action} {what}: {exc}", type(exc).__name__)
    if isinstance(exc, OSError):
        return StoreError(f"{action} {what}: {exc.strerror or exc}", "OSError")
    return StoreError(f"{action} {what}: {type(exc).__name__}: {exc}", type(exc).__name__)
