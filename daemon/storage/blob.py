"""The seam between the checkpoint store and GCS or Azure: :class:`BlobBackend`.

The dozen object operations every layer of :class:`~daemon.storage.store.CheckpointStore`
needs, in the terms both services share: list with sizes, MD5s and times; read a small
object with its *version* (GCS generation, Azure ETag); conditional create and
conditional replace on that version; delete; server-side copy pinned to the source's
version; a ranged read pinned the same way; a file upload in verified pieces (GCS
resumable upload, Azure staged blocks). :mod:`daemon.storage.gcs` and
:mod:`daemon.storage.azure_blob` implement it; :mod:`daemon.storage.backend` builds the
store on it.

What lives here: the interface, the values it passes (:class:`BlobObject`, :class:`Got`)
and the small helpers both implementations share. What must not: anything one service
does its own way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Protocol

from daemon.storage.errors import IntegrityError, StoreError
from daemon.storage.locations import BlobLocation, RemoteObject
from daemon.storage.records import _too_large

# Reads of a small object replaced between its properties and its bytes, in all.
GET_ATTEMPTS = 3


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


def get_pinned(
    url: str,
    max_bytes: int,
    read: Callable[[], Got | None],
    error: Callable[[Exception], StoreError],
    replaced: str,
) -> Got | None:
    """A small object read whole (:meth:`BlobBackend.get`): ``read`` asks for its
    properties, then for its bytes pinned to the version just seen (None when there is no
    object). One replaced between the two requests (its failure's code is ``replaced``)
    is read again; gone is None; bytes past ``max_bytes`` are an IntegrityError.
    ``error`` describes a failure of ``read``."""
    for attempt in range(GET_ATTEMPTS):
        try:
            got = read()
        except Exception as exc:
            err = error(exc)
            if err.code == replaced and attempt < GET_ATTEMPTS - 1:
                continue  # replaced between the two requests: read the new one
            if err.code == "NoSuchKey":
                return None
            raise err from exc
        if got is not None and len(got.data) > max_bytes:
            raise IntegrityError(_too_large(url, None, max_bytes))
        return got
    raise StoreError(  # pragma: no cover - the last attempt returns or raises
        f"read {url}: replaced while it was read, {GET_ATTEMPTS} times", "PreconditionFailed"
    )
