"""Download one remote checkpoint into a verified, complete local checkpoint directory.

The bytes are trusted only after we hashed them ourselves: S3-compatible servers (and
moto) do not all verify checksums, and an object can be overwritten after it was listed.
The directory is built the way every writer builds one (CONTRACT §4): files as
``<name>.partial`` in ``.tmp-step-<9 digits>-restore-<random>/``, fsynced and renamed,
the manifest last, the directory fsynced and renamed into place, ``local_dir`` fsynced.
Choosing *which* checkpoint to restore is
:meth:`daemon.storage.store.CheckpointStore.restore_newest`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import structlog
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    FlexibleChecksumError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from daemon.layout import (
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    TMP_PREFIX,
    FileEntry,
    Manifest,
    fsync_dir,
    start_writeback,
    step_dir_name,
)
from daemon.storage.errors import IntegrityError, StoreError, describe_error
from daemon.storage.locations import RemoteLocation, RemoteObject

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

T = TypeVar("T")

_STREAM_CHUNK = 1024 * 1024
_MiB = 1024 * 1024
# AWS's guidance for byte-range fetches is 8 or 16 MB: shorter, the first-byte latency
# of each request becomes a large share of its time.
_MIN_RANGE = 8 * _MiB
# botocore retries a request, but not a body that breaks off half-way: retry that here.
_STREAM_ATTEMPTS = 3
_STREAM_ERRORS = (
    ResponseStreamingError,
    IncompleteReadError,
    ReadTimeoutError,
    ConnectionClosedError,
)
# Local errors that a manifest's own paths cause (a name too long for this filesystem, a
# character it refuses, a file in the way of a directory), not the disk: that checkpoint
# cannot be restored here, an older one may well be.
_NAME_ERRNOS = frozenset(
    {
        errno.ENAMETOOLONG,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ELOOP,
        errno.EINVAL,
        errno.EILSEQ,
    }
)


class _InOrderHash:
    """SHA-256 of a file whose ranged parts land in any order, computed while they land.

    Each finished part is reported with :meth:`part_done`; whichever thread completes the
    part the hash is waiting for hashes it and every later part already there (read back
    from the page cache), so hashing overlaps the download instead of following it.
    """

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._size = size
        self._h = hashlib.sha256()
        self._next = 0
        self._ready: dict[int, int] = {}  # start -> length, finished but not yet hashed
        self._lock = threading.Condition()
        self._busy = False
        self._parts_left = 0

    def part_done(self, start: int, length: int) -> None:
        with self._lock:
            self._ready[start] = length
            if self._busy:
                return  # the hashing thread will find it
            self._busy = True
        fd = os.open(self._path, os.O_RDONLY)
        try:
            while True:
                with self._lock:
                    n = self._ready.pop(self._next, None)
                    if n is None:
                        self._busy = False
                        self._lock.notify_all()
                        return
                    offset = self._next
                end = offset + n
                while offset < end:
                    chunk = os.pread(fd, min(4 * _STREAM_CHUNK, end - offset), offset)
                    if not chunk:
                        break
                    self._h.update(chunk)
                    offset += len(chunk)
                with self._lock:
                    self._next = end
                    self._lock.notify_all()
        except BaseException:
            with self._lock:
                self._busy = False
                self._lock.notify_all()
            raise
        finally:
            os.close(fd)

    def expect(self, parts: int) -> None:
        """The number of parts the file comes in."""
        self._parts_left = parts

    def last_part_done(self) -> bool:
        """Count one finished part; True for the last one (its thread finishes the file)."""
        with self._lock:
            self._parts_left -= 1
            return self._parts_left == 0

    def result(self) -> str | None:
        """Wait until every reported byte is hashed; the digest when that is the whole file."""
        with self._lock:
            while self._busy:
                self._lock.wait()
            return self._h.hexdigest() if self._next == self._size else None


@dataclass(frozen=True)
class _Part:
    entry: FileEntry
    obj: RemoteObject
    partial: Path
    start: int
    length: int
    whole: bool  # the whole object in one GET, hashed while streaming
    hasher: _InOrderHash | None = None  # ranged parts: hashed in order as they finish


def download_checkpoint(
    client: S3Client,
    location: RemoteLocation,
    manifest: Manifest,
    manifest_raw: bytes,
    objects: Mapping[str, RemoteObject],
    local_dir: Path,
    *,
    part_size: int,
    max_concurrency: int,
    fetch: Callable[[_Part], str | None] | None = None,
) -> Path:
    """Fetch and verify every file of ``manifest``; return the new ``step-*`` directory.

    ``fetch`` reads one part into its partial file (None: S3 GETs through ``client``);
    a store on another service passes its own (see :mod:`daemon.storage.backend`).

    ``objects`` maps each listed path to the object listed for it. Files larger than
    ``part_size`` come down as parallel ranged GETs pinned to the listed ETag.
    Raises :class:`IntegrityError` when an object is missing, changed, or does not
    match its size or sha256, or when a listed path cannot be created on this filesystem
    (a name too long, a file in the way of a directory): the caller may fall back to an
    older checkpoint. :class:`StoreError` for any other storage failure. The temporary
    directory is removed on any failure; other local disk errors (full, read-only) come
    out as :class:`StoreError` too (code ``LocalIO``).
    """
    local_dir.mkdir(parents=True, exist_ok=True)
    # S3 serves each connection at about 90 MB/s, so every connection should stream:
    # about two ranges per connection, so that a slow one is made up for by the others,
    # none shorter than _MIN_RANGE (latency) nor longer than four parts (a range whose
    # stream breaks is fetched again whole). A file no larger than a range comes in one
    # GET, hashed as it streams; ranges are hashed in order as they land.
    total = manifest.total_bytes
    concurrency = max(1, max_concurrency)
    per_stream = -(-total // (2 * concurrency) // _MiB) * _MiB
    range_size = min(max(per_stream, _MIN_RANGE), max(4 * part_size, _MIN_RANGE))
    name = step_dir_name(manifest.step)
    tmp = local_dir / f"{TMP_PREFIX}{name}-restore-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        parts: list[_Part] = []
        dirs = {tmp}
        for entry in manifest.files:
            obj = objects.get(entry.path)
            if obj is None:
                raise IntegrityError(f"{location.url()}: {entry.path} is listed but was not found")
            partial = _create_partial(location, obj, entry, tmp)
            dirs.add(partial.parent)
            if entry.size <= range_size:
                parts.append(_Part(entry, obj, partial, 0, entry.size, whole=True))
            else:
                hasher = _InOrderHash(partial, entry.size)
                starts = range(0, entry.size, range_size)
                hasher.expect(len(starts))
                for start in starts:
                    length = min(range_size, entry.size - start)
                    parts.append(_Part(entry, obj, partial, start, length, False, hasher))

        def fetch_and_finish(part: _Part) -> str | None:
            # The thread that lands a file's last byte verifies, fsyncs and renames it, so
            # that work overlaps the download of the other files.
            digest = fetch(part) if fetch is not None else _fetch(client, location, part)
            if part.hasher is not None:
                if not part.hasher.last_part_done():
                    return None
                digest = part.hasher.result()
            _finish_file(location, part.entry, part.obj, tmp, digest)
            return None

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="restore") as pool:
            _run_all(pool, [(p, pool.submit(fetch_and_finish, p)) for p in parts])

        with open(tmp / (MANIFEST_NAME + PARTIAL_SUFFIX), "wb") as f:
            f.write(manifest_raw)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp / (MANIFEST_NAME + PARTIAL_SUFFIX), tmp / MANIFEST_NAME)
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)

        final = local_dir / name
        if final.exists():
            # Only reached when the local directory of this step did not validate (the
            # caller keeps a valid one): it is not a checkpoint, so it may go.
            aside = local_dir / f"{TMP_PREFIX}{name}-invalid-{os.urandom(4).hex()}"
            os.rename(final, aside)
            log.warning("local_checkpoint_replaced", step=manifest.step, path=str(final))
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(local_dir)
        return final
    except OSError as exc:
        # Local disk trouble (full, permissions): one line like every other restore failure.
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(
            f"restore step {manifest.step} into {local_dir}: {exc.strerror or exc}", "LocalIO"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _create_partial(
    location: RemoteLocation, obj: RemoteObject, entry: FileEntry, tmp: Path
) -> Path:
    """Create ``<path>.partial`` at the file's full size (ranged parts land anywhere)."""
    partial = tmp / (entry.path + PARTIAL_SUFFIX)
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            f.truncate(entry.size)
    except OSError as exc:
        _raise_if_name_error(location, obj, entry, exc)
        raise
    return partial


def _raise_if_name_error(
    location: RemoteLocation, obj: RemoteObject, entry: FileEntry, exc: OSError
) -> None:
    """IntegrityError (skip this checkpoint) when ``exc`` comes from the listed path."""
    if exc.errno in _NAME_ERRNOS:
        raise IntegrityError(
            f"{location.url(obj.key)}: cannot be written here as {entry.path[:80]!r}: "
            f"{exc.strerror or exc}"
        ) from exc


def _run_all(
    pool: ThreadPoolExecutor, jobs: list[tuple[T, Future[str | None]]]
) -> list[tuple[T, str | None]]:
    """Wait for every job; on the first failure cancel what has not started and re-raise."""
    by_future = {fut: item for item, fut in jobs}
    done: list[tuple[T, str | None]] = []
    try:
        for fut in as_completed(by_future):
            done.append((by_future[fut], fut.result()))
    except BaseException:
        for fut in by_future:
            fut.cancel()
        raise
    return done


def _fetch(client: S3Client, location: RemoteLocation, part: _Part) -> str | None:
    """GET one object or one range of it into the partial file; the sha256 when whole."""
    obj = part.obj
    url = location.url(obj.key)
    last: BaseException | None = None
    for _attempt in range(_STREAM_ATTEMPTS):
        try:
            if part.whole:
                resp = client.get_object(Bucket=location.bucket, Key=obj.key, IfMatch=obj.etag)
            else:
                end = part.start + part.length - 1
                resp = client.get_object(
                    Bucket=location.bucket,
                    Key=obj.key,
                    IfMatch=obj.etag,
                    Range=f"bytes={part.start}-{end}",
                )
        except ClientError as exc:
            err = describe_error(exc, action="download", location=location, key=obj.key)
            if err.code in ("NoSuchKey", "PreconditionFailed"):
                raise IntegrityError(str(err)) from exc
            raise err from exc
        except BotoCoreError as exc:
            raise describe_error(exc, action="download", location=location, key=obj.key) from exc

        h = hashlib.sha256() if part.whole else None
        body = resp["Body"]
        fd = os.open(part.partial, os.O_WRONLY)
        offset = part.start
        limit = part.start + part.length
        try:
            for chunk in body.iter_chunks(_STREAM_CHUNK):
                if offset + len(chunk) > limit:
                    raise IntegrityError(f"{url} has more bytes than the {part.entry.size} listed")
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(fd, view, offset)
                    offset += n
                    view = view[n:]
                if h is not None:
                    h.update(chunk)
            # To disk while the other ranges land: the file's fsync then waits for little.
            start_writeback(fd, part.start, part.length)
        except _STREAM_ERRORS as exc:
            last = exc
            log.info("download_retry", key=obj.key, start=part.start, error=str(exc))
            continue
        except FlexibleChecksumError as exc:
            raise IntegrityError(f"{url} failed the server's checksum: {exc}") from exc
        finally:
            os.close(fd)
            body.close()
        got = offset - part.start
        if got != part.length:
            raise IntegrityError(f"{url}: got {got} bytes, the manifest says {part.length}")
        if part.hasher is not None:
            part.hasher.part_done(part.start, part.length)
        return h.hexdigest() if h is not None else None
    assert last is not None
    raise describe_error(last, action="download", location=location, key=obj.key) from last


def _finish_file(
    location: RemoteLocation,
    entry: FileEntry,
    obj: RemoteObject,
    tmp: Path,
    streamed_sha256: str | None,
) -> str | None:
    """Check one downloaded file against the manifest, fsync it, rename it to its name."""
    partial = tmp / (entry.path + PARTIAL_SUFFIX)
    url = location.url(obj.key)
    with open(partial, "rb") as f:
        if streamed_sha256 is None:
            # Ranged parts arrived out of order; hash the assembled file (page cache, mostly).
            h = hashlib.sha256()
            while chunk := f.read(4 * _STREAM_CHUNK):
                h.update(chunk)
            digest = h.hexdigest()
        else:
            digest = streamed_sha256
        size = os.fstat(f.fileno()).st_size
        if size != entry.size:
            raise IntegrityError(f"{url}: {size} bytes, manifest says {entry.size}")
        if digest != entry.sha256:
            raise IntegrityError(f"{url}: sha256 does not match the manifest")
        os.fsync(f.fileno())
    try:
        os.rename(partial, tmp / entry.path)
    except OSError as exc:
        _raise_if_name_error(location, obj, entry, exc)
        raise
    return None
