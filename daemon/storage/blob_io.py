"""The file ends of blob transfers: a file as a backend reads it to send, an upload as a
future, and a part of a download written into place as a backend reads it back.

Used by :class:`~daemon.storage.backend.BlobCheckpointStore`; nothing here knows which
service is underneath (that is the :class:`~daemon.storage.blob.BlobBackend`'s).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import IO

import structlog

from daemon.storage.blob import BlobBackend, BlobObject
from daemon.storage.download import _Part
from daemon.storage.errors import IntegrityError, StoreError, UploadCancelled
from daemon.storage.etags import DigestingReader, EtagDigest
from daemon.storage.s3client import at_current_path

log = structlog.get_logger(__name__)

# Transient failures worth another try of one ranged read (the SDKs retry requests, not a
# body that breaks off half-way).
_RETRY_CODES = frozenset({"Unreachable", "Timeout", "Throttled", "ServerError"})
_READ_ATTEMPTS = 3


class Transfer:
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


class SendReader(DigestingReader):
    """The file as the backend reads it to send: feeds the expected-MD5 digest by offset
    (a retried piece read again is hashed once) and stops the upload once cancelled."""

    def __init__(
        self,
        f: IO[bytes],
        digest: EtagDigest | None,
        cancelled: Callable[[], str | None],
        what: str,
    ) -> None:
        super().__init__(f, digest)
        self._cancelled = cancelled
        self._what = what

    def _check(self) -> None:
        why = self._cancelled()
        if why is not None:
            raise UploadCancelled(f"upload {self._what}: upload cancelled ({why})")

    def read(self, amount: int | None = -1) -> bytes:
        self._check()
        return super().read(amount)

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def open_resolving(path: Path, resolve: Callable[[str], str]) -> IO[bytes]:
    """Open a file at its current path: a staged file's ``.tmp-`` directory may have been
    renamed into place since it was submitted (the open fd survives later renames)."""
    return at_current_path(lambda p: open(p, "rb"), str(path), resolve)  # closed by the upload


def fetch_part(backend: BlobBackend, part: _Part) -> str | None:
    """Read one part of a download into its partial file through ``backend``, pinned to
    the listed version; the sha256 when it is the whole file. A read that breaks off is
    tried again."""
    obj = part.obj
    url = backend.location.url(obj.key)
    version = obj.version if isinstance(obj, BlobObject) and obj.version else None
    last: StoreError | None = None
    for attempt in range(_READ_ATTEMPTS):
        writer = _PartWriter(part, url)
        try:
            backend.read_range(obj.key, version, part.start, part.length, writer.write)
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
