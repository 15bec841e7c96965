"""The emergency pipeline: upload a checkpoint's files while the rest is still being written.

CONTRACT §4: inside ``.tmp-step-N-*/`` a file under its final name (renamed from
``<name>.partial``) is finished and never changes again. The :class:`Stager` follows each
``<name>.partial`` as it grows (:class:`~daemon.storage.tail.TailUpload`: every full part
is sent as soon as it is on disk, the multipart upload completes at the rename), and
sends at once any file it first sees under its final name, to its final key under
``checkpoints/step-N/``. Nothing staged
there is visible to restore, which trusts only manifests, and only the commit writes
the manifest: it follows the writer's rename of the directory to ``step-N/``, and
:meth:`Stager.take` first checks that every file the manifest lists was staged from
that very directory, is still the same file (inode, size, mtime) and has the size the
manifest gives (:mod:`daemon.storage.staged` holds those checks). A file that was not
(staged too late, failed, or different) is sent again by the commit.

A tail upload hashes what it sends with sha256 in the same pass, so the commit checks it
against the manifest before it counts (a mismatch, or a file changed after its rename, is
sent again). For files first seen finished, what the server stored is checked without a
second pass over the bytes: s3transfer's reads of each part feed an MD5
(:class:`~daemon.storage.s3client.EtagDigest`), whose ETag the commit compares with the
stored object's before it writes the manifest. Our own sha256 of such files is not
computed before the commit (a file under its final name never changes, and the CPU is the
bottleneck while the trainer is still writing): the commit is ``pending``, and
:class:`daemon.storage.sync.CheckpointSync` hashes its files afterwards before it may count
as verified for retention. Files that may be copied server-side from the previous commit
are still hashed first (the sha256 decides the copy); a file followed while it was
written is sent, not copied, even when it turns out unchanged (its bytes are not known
until they are on the wire, and in a drain time counts more than bandwidth).

Events are hints, rescans are truth: the watchdog handler of :mod:`daemon.storage.sync` only
calls :meth:`Stager.hint`; the stager thread rescans every ``.tmp-step-*`` directory on
each hint and every ``rescan_interval`` seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from daemon import layout
from daemon.layout import HASH_CHUNK
from daemon.storage.s3client import EtagDigest, StoreError, UploadCancelled
from daemon.storage.staged import Staged, TmpDir, check_staged, file_ident, settle
from daemon.storage.store import CheckpointStore, RemoteCheckpoint, StagedFile, copy_etag
from daemon.storage.tail import PartSlots, TailUpload

log = structlog.get_logger(__name__)

# A writer's own temporary directory, not a restore's nor one set aside as invalid.
_SKIP_MARKERS = ("-restore-", "-invalid")


class Stager:
    """Stages the files of checkpoints being written; :meth:`take` hands them to the commit."""

    def __init__(
        self,
        store: CheckpointStore,
        local_dir: Path,
        *,
        rescan_interval: float = 0.25,
        hash_workers: int = 2,
        tail: bool = True,
    ) -> None:
        """``tail``: follow ``.partial`` files as they grow (see :mod:`daemon.storage.tail`);
        otherwise each file is sent once renamed into place."""
        self._store = store
        self._tail = tail
        # The tails' part uploads: as many as one transfer of the store may have in
        # flight, and as many parts in memory (plus one being read per tail).
        self._concurrency = max(1, store.transfer_config.max_request_concurrency)
        self._part_pool: ThreadPoolExecutor | None = None
        self._slots = PartSlots(self._concurrency)
        self._dir = local_dir
        self._rescan_interval = rescan_interval
        self._lock = threading.Lock()
        self._dirs: dict[int, TmpDir] = {}  # by step: one writer's directory per step
        self._refused_steps: set[int] = set()  # committed already: never staged
        self._hash_pool = ThreadPoolExecutor(max_workers=hash_workers, thread_name_prefix="stage")
        self._hint = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.previous: RemoteCheckpoint | None = None  # for server-side copies
        self.bytes_staged = 0
        store.add_path_resolver(self.resolve)

    # --- lifecycle -------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the stager thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Rescan at once, then on every hint and every ``rescan_interval`` seconds."""
        if self.active:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="stager", daemon=True)
        self._thread.start()
        log.info("staging_started", local_dir=str(self._dir))

    def hint(self) -> None:
        """A file may have appeared under its final name (from the watchdog handler)."""
        self._hint.set()

    def stop(self) -> None:
        """Stop scanning; what is staged stays staged for :meth:`take`."""
        self._stopping.set()
        self._hint.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.scan()
            except Exception as exc:  # a scan must never kill the thread: log, rescan later
                log.warning("staging_scan_failed", error=str(exc))
            self._hint.wait(timeout=self._rescan_interval)
            self._hint.clear()

    # --- scanning ----------------------------------------------------------------------

    def scan(self) -> int:
        """Stage every finished file of every ``.tmp-step-*`` directory; how many were new."""
        if self._store.cancel_switch.cancelled:
            return 0
        new = 0
        try:
            entries = list(os.scandir(self._dir))
        except FileNotFoundError:
            return 0
        for e in entries:
            step = layout.parse_tmp_dir(e.name)
            if step is None or any(m in e.name for m in _SKIP_MARKERS):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # renamed into place (or removed) meanwhile: the commit takes over
            if not stat.S_ISDIR(st.st_mode):
                # A symlink would have os.walk stage wherever it points; no writer makes one.
                continue
            tmp = self._dir_for(step, Path(e.path), st.st_ino)
            if tmp is not None:
                new += self._scan_dir(tmp)
        return new

    def _dir_for(self, step: int, path: Path, ino: int) -> TmpDir | None:
        with self._lock:
            cur = self._dirs.get(step)
            if cur is not None and cur.ino == ino:
                return cur
        if cur is not None:
            if cur.path.exists():
                return None  # two writers of one step: stage the first only
            # The writer of the first died (its directory is gone): start over with this one.
            self._drop(cur, why="writer directory gone")
        if step in self._refused_steps:
            return None
        try:
            committed = self._store.is_committed(step)
        except StoreError as exc:
            log.warning("staging_check_failed", step=step, error=str(exc))
            return None
        if committed:
            # Another instance (or an earlier life of this one) committed this step: its
            # objects are someone's commit, and staged bytes must never replace them.
            self._refused_steps.add(step)
            log.warning("staging_refused_committed_step", step=step, path=str(path))
            return None
        tmp = TmpDir(path, step, ino)
        with self._lock:
            self._dirs[step] = tmp
        log.info("staging_dir_found", step=step, path=str(path))
        return tmp

    def _scan_dir(self, tmp: TmpDir) -> int:
        new = 0
        for root, _dirs, files in os.walk(tmp.path):
            for name in files:
                full = Path(root) / name
                if name.endswith(layout.PARTIAL_SUFFIX):
                    if self._tail:
                        self._follow(tmp, full)
                    continue  # still being written
                rel = full.relative_to(tmp.path).as_posix()
                if rel == layout.MANIFEST_NAME or rel in tmp.refused:
                    continue
                cur = tmp.files.get(rel)
                if cur is not None:
                    if cur.tail is None:
                        continue
                    if not cur.tail.failed:
                        cur.tail.wake()  # renamed into place: the tail completes it
                        continue
                    # The tail failed (a part, or the file was replaced): send it whole.
                try:
                    st = full.lstat()
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    self._refuse(tmp, rel, full, st)
                    continue
                self._stage(tmp, rel, full, file_ident(st))
                new += 1
        return new

    def _follow(self, tmp: TmpDir, partial: Path) -> None:
        """Start a tail upload of ``partial`` unless one follows it already."""
        rel = partial.relative_to(tmp.path).as_posix()[: -len(layout.PARTIAL_SUFFIX)]
        if rel == layout.MANIFEST_NAME or rel in tmp.refused:
            return
        cur = tmp.files.get(rel)
        if cur is not None and (cur.tail is None or not cur.tail.failed):
            return
        try:
            st = partial.lstat()
        except FileNotFoundError:
            return  # renamed meanwhile: the next scan sees it under its final name
        if not stat.S_ISREG(st.st_mode):
            return  # never read through a symlink; the commit refuses such a file
        if cur is not None and cur.tail is not None and cur.tail.ino == st.st_ino:
            return  # the file whose tail failed: it is sent whole once renamed
        if self._store.cancel_switch.cancelled:
            return
        key = self._store.file_key(tmp.step, rel)
        unrenamed = str(tmp.path / rel)
        try:
            tail = TailUpload(
                self._store,
                key,
                partial,
                lambda: Path(self.resolve(unrenamed)),
                part_size=self._store.transfer_config.multipart_chunksize,
                pool=self._part_workers(),
                slots=self._slots,
                whole_md5=self._store.whole_md5_etags,
                server_verified=self._store.server_verifies_checksums,
            )
        except (OSError, ValueError) as exc:  # gone meanwhile, or parts below S3's minimum
            log.info("tail_upload_skipped", step=tmp.step, path=rel, reason=str(exc))
            return
        done: Future[str] = Future()
        done.set_result("")
        with self._lock:
            tmp.files[rel] = Staged(rel, key, (tail.ino, -1, -1), done, tail=tail)
        tail.start()
        log.info("file_followed", step=tmp.step, path=rel)

    def _part_workers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._part_pool is None:
                self._part_pool = ThreadPoolExecutor(
                    max_workers=self._concurrency, thread_name_prefix="tail-part"
                )
            return self._part_pool

    def _refuse(self, tmp: TmpDir, rel: str, path: Path, st: os.stat_result) -> None:
        # Never staged: a symlink could point anywhere (/etc, another run). os.walk does not
        # descend into symlinked directories, so only the file itself needs this check. The
        # commit refuses a checkpoint whose manifest lists such a file (layout.open_listed).
        tmp.refused.add(rel)
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        log.warning("staging_refused", step=tmp.step, path=str(path), reason=kind)

    def _stage(self, tmp: TmpDir, rel: str, path: Path, ident: tuple[int, int, int]) -> None:
        key = self._store.file_key(tmp.step, rel)
        copy_src = self._copy_candidate(rel, ident[1])
        staged = Staged(rel, key, ident, Future())
        if copy_src is None:
            # Send at once. The upload's reads feed the MD5 of the ETag check; when the
            # part boundaries are unknown, hash alongside instead (sha256).
            checkable = self._store.etag_checkable(ident[1], staged=True)
            # Fed by offset from s3transfer's concurrent reads: AWS's convention only.
            digest = self._store.etag_digest(ident[1], in_order=False) if checkable else None
            try:
                staged.transfer = self._store.start_upload(path, key, None, digest, staged=True)
            except UploadCancelled:
                return
            if digest is not None:
                staged.digest = digest
                staged.job.set_result("")
            else:
                staged.job = self._hash_pool.submit(self._hash, str(path))
        else:
            # Same path and size as a file of the previous commit: hash first, then copy
            # server-side when the bytes are the same (often frozen weights), else send.
            staged.job = self._hash_pool.submit(self._hash_then_copy, staged, str(path), copy_src)
        with self._lock:
            tmp.files[rel] = staged
        log.info("file_staged", step=tmp.step, path=rel, bytes=ident[1], copy=copy_src is not None)

    def _copy_candidate(self, rel: str, size: int) -> Any:
        prev = self.previous
        if prev is None or size == 0:
            return None
        for entry in prev.manifest.files:
            if entry.path == rel and entry.size == size and rel in prev.objects:
                return (prev.objects[rel], entry)
        return None

    def _hash(self, path: str, digest: EtagDigest | None = None) -> str:
        h = hashlib.sha256()
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below; reopened at its new path
        except FileNotFoundError:
            f = open(self.resolve(path), "rb")  # noqa: SIM115
        with f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
                if digest is not None:
                    digest.update(chunk)
        return h.hexdigest()

    def _hash_then_copy(self, staged: Staged, path: str, src: Any) -> str:
        size = staged.ident[1]
        etag_digest = self._store.etag_digest(size)
        sha = self._hash(path, etag_digest)
        obj, entry = src
        if sha == entry.sha256 and self._store.copy_file(obj, staged.key, entry):
            staged.copied = True
            staged.etag = copy_etag(obj)
        else:
            if self._store.etag_checkable(size, staged=True):
                staged.etag = etag_digest.etag()
            staged.transfer = self._store.start_upload(Path(path), staged.key, sha, staged=True)
        return sha

    def resolve(self, path: str) -> str:
        """The current path of a staged file whose ``.tmp-`` directory was renamed into place."""
        with self._lock:
            dirs = list(self._dirs.values())
        for tmp in dirs:
            prefix = str(tmp.path) + os.sep
            if path.startswith(prefix):
                final = self._dir / layout.step_dir_name(tmp.step)
                try:
                    if final.stat().st_ino == tmp.ino:
                        return str(final / path[len(prefix) :])
                except FileNotFoundError:
                    pass
        return path

    # --- the commit's side -------------------------------------------------------------

    def take(self, step: int, ckpt_dir: Path, manifest: layout.Manifest) -> dict[str, StagedFile]:
        """The files of ``manifest`` staged from ``ckpt_dir``, usable for the commit.

        Waits for their uploads. A file counts only when it was staged from the directory
        that was renamed to ``ckpt_dir`` (same inode), still is the same file (inode, size,
        mtime) of the size the manifest gives, its upload succeeded and read every byte
        (so its expected ETag is known), and, where we hashed it, our sha256 equals the
        manifest's. Raises :class:`UploadCancelled` when uploads were cancelled meanwhile.
        """
        with self._lock:
            tmp = self._dirs.get(step)
        if tmp is None:
            return {}
        try:
            return self._take(tmp, ckpt_dir, manifest)
        finally:
            # Only now: until its uploads are done, resolve() must still find the directory.
            with self._lock:
                if self._dirs.get(step) is tmp:
                    del self._dirs[step]

    def _take(
        self, tmp: TmpDir, ckpt_dir: Path, manifest: layout.Manifest
    ) -> dict[str, StagedFile]:
        step = tmp.step
        try:
            same_dir = ckpt_dir.stat().st_ino == tmp.ino
        except FileNotFoundError:
            same_dir = False
        usable: dict[str, StagedFile] = {}
        listed = {e.path: e for e in manifest.files}
        for rel, staged in list(tmp.files.items()):
            entry = listed.get(rel)
            checked = check_staged(self._store, staged, entry, ckpt_dir, same_dir)
            if isinstance(checked, StagedFile):
                usable[rel] = checked
            elif entry is not None:
                log.warning("staged_file_resent", step=step, path=rel, reason=checked)
        nbytes = sum(f.size for f in usable.values())
        self.bytes_staged += nbytes
        log.info(
            "staged_files_taken",
            step=step,
            files=len(usable),
            listed=len(listed),
            bytes=nbytes,
            sha256_pending=sum(not f.sha256_checked for f in usable.values()),
        )
        return usable

    def _drop(self, tmp: TmpDir, why: str) -> None:
        with self._lock:
            if self._dirs.get(tmp.step) is tmp:
                del self._dirs[tmp.step]
        for staged in tmp.files.values():
            if staged.transfer is not None and not staged.transfer.done():
                staged.transfer.cancel()
        for staged in tmp.files.values():
            if staged.tail is not None:
                staged.tail.abandon(why)  # aborts its multipart upload
        for staged in tmp.files.values():
            with contextlib.suppress(StoreError, OSError):
                staged.job.result()
            settle(self._store, staged)
        log.info("staging_dropped", step=tmp.step, files=len(tmp.files), why=why)

    def abandon(self, why: str) -> list[int]:
        """Cancel what is staged for checkpoints that will not be committed; their steps.

        Their unfinished multipart uploads are aborted; their finished objects stay
        invisible to restore (no manifest) until retention or a later commit of the step
        replaces them.
        """
        with self._lock:
            dirs = list(self._dirs.values())
        steps = []
        for tmp in dirs:
            t0 = time.monotonic()
            self._drop(tmp, why=why)
            try:
                # Only the keys staged here: another node may be uploading this step.
                self._store.abort_incomplete_uploads(
                    self._store.step_prefix(tmp.step),
                    keys={staged.key for staged in tmp.files.values()},
                )
            except StoreError as exc:
                log.warning("staging_abort_failed", step=tmp.step, error=str(exc))
            log.info(
                "staging_abandoned",
                step=tmp.step,
                why=why,
                seconds=round(time.monotonic() - t0, 3),
            )
            steps.append(tmp.step)
        # The drain's flush ends here: every tail is taken or dropped, its parts' buffers
        # back in the pool. Hand them to the allocator (the next drain faults its own).
        self._slots.clear()
        return steps

    def close(self) -> None:
        """Stop scanning, abort the tails nobody took, release the threads."""
        self.stop()
        with self._lock:
            left = [t for d in self._dirs.values() for f in d.files.values() if (t := f.tail)]
        for tail in left:
            if not tail.done:
                tail.abandon("stager closed")
        self._hash_pool.shutdown(wait=True)
        if self._part_pool is not None:
            self._part_pool.shutdown(wait=True)
        self._slots.clear()
