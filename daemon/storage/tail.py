"""Upload a file while its writer is still appending to it (the emergency pipeline's tail).

CONTRACT §4: a checkpoint file is written as ``<name>.partial``, fsynced, then renamed to
``<name>``; under its final name it is finished. Waiting for the rename before sending
anything makes a checkpoint of one large file (the usual shape under a few GiB) upload
strictly after it is written. A :class:`TailUpload` instead follows the ``.partial`` file
as it grows:

* each full part (``part_size`` bytes) is read once from the page cache as soon as it is
  on disk, folded into the file's sha256 (in order, by the one reading thread), and sent
  as an UploadPart of a multipart upload created at the first full part. The part's
  bytes are held in memory until sent, so what is hashed is exactly what is sent, retries
  included; a shared :class:`PartSlots` bounds how many parts wait in memory, and keeps
  their buffers for the next parts;
* when ``<name>`` appears with the same inode (renamed into place: the size is now
  final), the rest of the file is read and sent, and the multipart upload is completed
  (a file that never reached one part goes up as one PutObject instead);
* the result is the size, the sha256 of every byte sent, the ETag the object must have
  (MD5 of the parts' MD5s and ``-N``, computed from the sent bytes), and the final
  file's identity (inode, size, mtime). The commit (:meth:`Stager.take`) uses the upload
  only when that sha256 equals the manifest's and the file under its final name is still
  the same file: CONTRACT §4 says it never changes after the rename, and a writer that
  broke it (rewrote bytes already sent, or the file after the rename) has its file sent
  again by the commit, never committed wrong;
* on an endpoint that refuses a body not matching its additional checksum (AWS; see
  :attr:`~daemon.storage.integrity.EndpointIntegrity.verifies_checksums`) no MD5 is
  computed: each part's checksum, computed from the buffer the sha256 saw, goes with
  it, the server verifies it, and the ETag is the one CompleteMultipartUpload answered
  (``server_verified``). The MD5 was half of the tail's CPU (2.3 of 4.4 s/GB on the
  benchmarks' VM), taken from the CPUs the trainer writes with;
* a file abandoned (unlinked without being renamed: its writer cleaned up or died and
  was cleaned up), a failed part, a cancelled switch or :meth:`abandon` aborts the
  multipart upload. A writer killed mid-file leaves its ``.partial`` behind: the stager
  abandons it when the drain's flush finds the checkpoint never completed.

Nothing assumes more of the writer than CONTRACT §4; an append-only writer (``torch.save``
through :class:`daemon.layout.HashingWriter`, which all of ``trainer/`` uses) gets every
part sent while it writes, any other writer gets its file re-sent by the commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from daemon.storage.etags import normalize_etag
from daemon.storage.integrity import additional_checksum
from daemon.storage.s3client import StoreError, UploadCancelled, describe_error
from daemon.storage.store import CheckpointStore
from daemon.storage.transfers import COMPLETE_WAIT

log = structlog.get_logger(__name__)

# How often a tail looks for new bytes when none arrived: a writer at 1 GB/s fills a
# 16 MiB part in 16 ms, so waiting 10 ms costs little latency and a few fstat calls.
POLL_SECONDS = 0.01
# S3's limits on multipart uploads: at most 10,000 parts, each but the last >= 5 MiB.
MAX_PARTS = 10_000
MIN_PART = 5 * 1024 * 1024


class TailFailed(StoreError):
    """The tail upload did not produce a usable object (the commit sends the file)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "TailFailed")


@dataclass(frozen=True)
class TailResult:
    """What a finished tail upload sent: the commit checks it against the manifest."""

    size: int
    sha256: str  # of every byte sent, in order
    etag: str  # the ETag the stored object must have (no quotes)
    ident: tuple[int, int, int]  # the final file's (inode, size, mtime_ns) when completed
    parts: int  # 0 for a single PutObject
    # ``etag`` is the one the server answered, for bytes whose checksum it verified.
    server_verified: bool = False


class PartSlots:
    """Bounds the parts read but not yet sent, across every tail of one stager, and
    keeps their buffers for the next parts.

    A part is held in memory from its read until its UploadPart returns, so the memory a
    drain costs is at most ``count`` x part size, however many files are being written.
    A full part is read into a buffer of the pool (:meth:`buffer`), given back with its
    slot (:meth:`release`). A fresh 16 MiB buffer per part is faulted in again whenever
    the allocator has handed its pages back, on the CPUs the trainer is writing with: 2
    GiB followed here took about 95,000 page faults that way, 22,000 with the pool. A
    fault is cheap on bare metal and costly on a VM that reports free pages to its host.
    The pool never holds more buffers than slots.
    """

    def __init__(self, count: int) -> None:
        self._sem = threading.BoundedSemaphore(max(1, count))
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for a slot; False when ``stop`` was set meanwhile."""
        while not stop.is_set():
            if self._sem.acquire(timeout=0.05):
                return True
        return False

    def buffer(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes for the part of an acquired slot."""
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) == size:
                    return buf
        return bytearray(size)

    def release(self, buf: bytearray | None = None) -> None:
        """Give the slot back, and its part's buffer (no longer read by anyone)."""
        if buf is not None:
            with self._lock:
                self._free.append(buf)
        self._sem.release()

    @property
    def kept(self) -> int:
        """How many buffers wait in the pool for the next parts."""
        with self._lock:
            return len(self._free)

    def clear(self) -> None:
        """Drop the buffers kept (the stager is done with them)."""
        with self._lock:
            self._free.clear()


def _ident(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


class TailUpload:
    """One ``.partial`` file sent part by part as it grows; see the module docstring.

    ``final_path`` says where the file lives under its final name *now* (its directory
    may have been renamed into place meanwhile). The upload runs in a thread of its own
    from :meth:`start`; :meth:`result` waits for it.
    """

    def __init__(
        self,
        store: CheckpointStore,
        key: str,
        partial: Path,
        final_path: Callable[[], Path],
        *,
        part_size: int,
        pool: ThreadPoolExecutor,
        slots: PartSlots,
        poll: float = POLL_SECONDS,
        whole_md5: bool = False,
        server_verified: bool = False,
    ) -> None:
        """``whole_md5``: the endpoint gives a multipart object the MD5 of its whole bytes
        as ETag (s3rver; see :class:`~daemon.storage.s3client.EndpointIntegrity`): predict
        that one, in the reading pass, so the commit need not read the object back.
        ``server_verified``: the endpoint verifies each part's additional checksum, and
        the result's ETag is the one it answered (no MD5 computed; see the module)."""
        if part_size < MIN_PART:
            raise ValueError(f"part size {part_size} is below S3's minimum of {MIN_PART}")
        self.key = key
        self.partial = partial
        self._store = store
        self._final_path = final_path
        self._final_hint: Path | None = None
        self._part_size = part_size
        self._pool = pool
        self._slots = slots
        self._poll = poll
        # Opened now, while the name is there: the fd follows the file through renames.
        # O_NOFOLLOW: a symlink put in place of the file is never read (it could be anything).
        self._fd = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW)
        st = os.fstat(self._fd)
        self.ino = st.st_ino
        self._algorithm: str | None = store.upload_args(None).get("ChecksumAlgorithm")
        self.server_verified = server_verified and self._algorithm is not None
        self._sha = hashlib.sha256()
        predict_whole = whole_md5 and not self.server_verified
        self._whole = hashlib.md5(usedforsecurity=False) if predict_whole else None
        self._offset = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._md5s: list[bytes] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._done = threading.Event()
        self._result: TailResult | None = None
        self._error: StoreError | None = None
        self._thread = threading.Thread(target=self._run, name=f"tail:{partial.name}", daemon=True)
        self.sent_while_writing = 0  # bytes sent before the rename was seen

    # --- control ---------------------------------------------------------------------

    def start(self) -> TailUpload:
        self._thread.start()
        return self

    def wake(self) -> None:
        """Something changed (the file was renamed, or grew): look now."""
        self._wake.set()

    def finish_at(self, final: Path) -> None:
        """The file is now ``final`` (its directory was renamed into place): look there."""
        self._final_hint = final
        self._wake.set()

    def abandon(self, why: str) -> None:
        """Stop and abort the multipart upload (nothing of it is ever committed)."""
        self._stop_reason = why
        self._stop.set()
        self._wake.set()
        self._thread.join()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def failed(self) -> bool:
        return self._done.is_set() and self._error is not None

    def result(self, timeout: float | None = None) -> TailResult:
        """The finished upload; :class:`TailFailed` (or :class:`UploadCancelled`) if none."""
        if not self._done.wait(timeout):
            raise TailFailed(f"tail upload of {self.partial.name} not finished in time")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    # --- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._result = self._follow()
            log.info(
                "tail_upload_completed",
                key=self.key,
                bytes=self._result.size,
                parts=self._result.parts,
                sent_while_writing=self.sent_while_writing,
            )
        except BaseException as exc:
            err = exc if isinstance(exc, StoreError) else self._describe(exc, "upload")
            self._error = err
            self._abort(str(err))
        finally:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._done.set()

    def _follow(self) -> TailResult:
        while True:
            self._check_stop()
            st = os.fstat(self._fd)
            if st.st_size - self._offset >= self._part_size:
                self._send_part(self._part_size)
                continue
            final = self._finished()
            if final is not None:
                self.sent_while_writing = self._offset
                return self._finish(final)
            if st.st_nlink == 0:
                raise TailFailed(f"{self.partial.name} was removed before it was renamed")
            self._wake.wait(self._poll)
            self._wake.clear()

    def _check_stop(self) -> None:
        if self._store.cancel_switch.cancelled:
            raise UploadCancelled(f"tail upload of {self.key}: {self._store.cancel_switch.reason}")
        if self._stop.is_set():
            raise TailFailed(f"tail upload of {self.key} abandoned: {self._stop_reason}")

    def _finished(self) -> os.stat_result | None:
        """The final file's stat when ``<name>`` is this very file (the rename happened);
        :class:`TailFailed` when another file took that name (this one never will)."""
        hint = self._final_hint
        for path in (hint, self._final_path()) if hint is not None else (self._final_path(),):
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if st.st_ino == self.ino:
                return st
            raise TailFailed(f"another file was renamed to {path.name}")
        return None

    def _finish(self, final: os.stat_result) -> TailResult:
        # Renamed: the size is final (CONTRACT §4). Send what is left, then complete.
        size = final.st_size
        if size < self._offset:
            raise TailFailed(f"{self.partial.name} shrank below the {self._offset} bytes sent")
        if self._upload_id is None:
            data = self._read(size)
            self._check_stop()
            etag = self._put_whole(data)
            return TailResult(
                size, self._sha.hexdigest(), etag, _ident(final), 0, self.server_verified
            )
        while self._offset < size:
            self._send_part(min(self._part_size, size - self._offset))
        parts = [f.result() for f in self._parts]  # re-raises a failed part
        self._check_stop()
        served: str | None = None
        try:
            done = self._call(
                "complete",
                lambda: self._store.client.complete_multipart_upload(
                    Bucket=self._store.location.bucket,
                    Key=self.key,
                    UploadId=str(self._upload_id),
                    MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                ),
            )
            served = normalize_etag(str(done.get("ETag") or ""))
        except StoreError as exc:
            # Completing a large object can outlast even its longer read timeout ("could
            # take several minutes", AWS says); botocore's retry then finds the upload
            # taken and fails while the server is still assembling it. The object is what
            # counts (the commit checks its ETag): wait for it a while before sending the
            # file again.
            if isinstance(exc, UploadCancelled) or not self._store.stored_within(
                self.key, size, COMPLETE_WAIT
            ):
                raise
            log.info("tail_upload_completed_on_retry", key=self.key, error=str(exc))
        self._upload_id = None  # completed: nothing to abort any more
        if self.server_verified:
            if not served:
                # Its answer was lost (completed on a retry) and no MD5 was kept: read the
                # object back. Our bytes under one ETag are ours; else the commit sends
                # the file again. (Reading costs less than sending: a 256 MiB complete
                # outlasted the read timeout on a loaded s3rver.)
                served = self._store.etag_if_sha256(self.key, self._sha.hexdigest())
                if not served:
                    raise TailFailed(f"{self.key}: completed, but holds other bytes")
                log.info("tail_upload_read_back", key=self.key, etag=served)
            return TailResult(size, self._sha.hexdigest(), served, _ident(final), len(parts), True)
        joined = b"".join(self._md5s)
        etag = f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(self._md5s)}"
        if self._whole is not None:
            etag = self._whole.hexdigest()
        return TailResult(size, self._sha.hexdigest(), etag, _ident(final), len(parts))

    def _read_into(self, buf: bytearray) -> bytearray:
        """The next ``len(buf)`` bytes of the file into ``buf``, folded into the hashes."""
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = os.preadv(self._fd, [view[got:]], self._offset + got)
            if not n:
                end = self._offset + len(buf)
                raise TailFailed(f"{self.partial.name} ended before its {end} bytes")
            got += n
        # The one in-order pass over the bytes: the sha256 of exactly what is sent.
        self._sha.update(view)
        if self._whole is not None:
            self._whole.update(view)
        return buf

    def _read(self, n: int) -> bytes:
        """The next ``n`` bytes as bytes of their own: a file's last, shorter part, or a
        whole file sent as one PutObject (never pooled: one copy per file)."""
        return bytes(self._read_into(bytearray(n)))

    def _send_part(self, n: int) -> None:
        if len(self._parts) >= MAX_PARTS:
            raise TailFailed(f"{self.partial.name} needs more than {MAX_PARTS} parts")
        if not self._slots.acquire(self._stop):
            raise TailFailed(f"tail upload of {self.key} abandoned: {self._stop_reason}")
        buf: bytearray | None = None
        try:
            # A full part goes through a pooled buffer; a file's last, shorter one gets
            # bytes of its own size (S3 needs the body's exact length).
            if n == self._part_size:
                buf = self._slots.buffer(n)
            data: bytes | bytearray = self._read_into(buf) if buf is not None else self._read(n)
            self._offset += n
            if self._upload_id is None:
                self._create()
            number = len(self._parts) + 1
            # MD5 slots are filled by the workers, in part order.
            self._md5s.append(b"")
            self._parts.append(self._pool.submit(self._upload_part, number, data))
        except BaseException:
            self._slots.release(buf)
            raise

    def _create(self) -> None:
        self._check_stop()
        extra: dict[str, Any] = {}
        if self._algorithm:
            extra["ChecksumAlgorithm"] = self._algorithm
        resp = self._call(
            "start",
            lambda: self._store.client.create_multipart_upload(
                Bucket=self._store.location.bucket, Key=self.key, **extra
            ),
        )
        self._upload_id = resp["UploadId"]
        log.info("tail_upload_started", key=self.key, part_size=self._part_size)

    def _upload_part(self, number: int, data: bytes | bytearray) -> dict[str, Any]:
        try:
            if self._stop.is_set() or self._store.cancel_switch.cancelled:
                raise TailFailed(f"tail upload of {self.key} stopped before part {number}")
            if self._whole is None and not self.server_verified:
                # In the worker, beside the reader's sha256 of the next part: two cores,
                # two hashes. (An endpoint of whole-object MD5s needs no part MD5s.)
                self._md5s[number - 1] = hashlib.md5(data, usedforsecurity=False).digest()
            # Computed here, so that the same value goes with the part and into
            # CompleteMultipartUpload (AWS requires both to match).
            checksum = additional_checksum(self._algorithm, data)
            extra: dict[str, Any] = dict(checksum)
            if self._algorithm and not checksum:
                extra["ChecksumAlgorithm"] = self._algorithm  # botocore computes it
            resp = self._call(
                "upload part",
                lambda: self._store.client.upload_part(
                    Bucket=self._store.location.bucket,
                    Key=self.key,
                    UploadId=str(self._upload_id),
                    PartNumber=number,
                    # botocore takes a bytearray as a blob (its validator says so; the
                    # stubs list bytes only) and sends it as it is, without a copy.
                    Body=data,  # type: ignore[arg-type]
                    **extra,
                ),
            )
            fields: dict[str, Any] = dict(resp)
            part: dict[str, Any] = {"PartNumber": number, "ETag": fields["ETag"]}
            for name in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumSHA256", "ChecksumSHA1"):
                value = checksum.get(name) or fields.get(name)
                if value:
                    part[name] = value
            return part
        finally:
            # Its UploadPart has returned (retries included): nothing reads the buffer now.
            self._slots.release(data if isinstance(data, bytearray) else None)

    def _put_whole(self, data: bytes) -> str:
        extra: dict[str, Any] = dict(self._store.upload_args(self._sha.hexdigest()))
        done = self._call(
            "upload",
            lambda: self._store.client.put_object(
                Bucket=self._store.location.bucket, Key=self.key, Body=data, **extra
            ),
        )
        served = normalize_etag(str(done.get("ETag") or ""))
        if self.server_verified and served:
            return served
        self.server_verified = False  # no ETag in the answer: the MD5 checks it instead
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def _abort(self, why: str) -> None:
        # Parts not yet sent see the stop and return at once (never cancelled: each
        # holds a slot that only its own run releases).
        self._stop_reason = self._stop_reason or why
        self._stop.set()
        for fut in self._parts:
            with contextlib.suppress(BaseException):
                fut.result()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            log.info("tail_upload_dropped", key=self.key, why=why)
            return
        try:
            # Allowed after the cancel switch: aborting writes nothing.
            self._store.client.abort_multipart_upload(
                Bucket=self._store.location.bucket, Key=self.key, UploadId=upload_id
            )
            log.info("tail_upload_aborted", key=self.key, why=why)
        except (ClientError, BotoCoreError) as exc:
            # Some servers (s3rver) cannot abort; the boot-time sweep retries on AWS.
            log.warning("tail_upload_abort_failed", key=self.key, why=why, error=str(exc))

    def _call(self, action: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (ClientError, BotoCoreError, OSError) as exc:
            raise self._describe(exc, action) from exc

    def _describe(self, exc: BaseException, action: str) -> StoreError:
        return describe_error(exc, action=action, location=self._store.location, key=self.key)
