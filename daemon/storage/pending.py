"""Verifying pending (emergency) commits: hashing their staged files after the commit.

A checkpoint staged while it was being written (see :class:`~daemon.storage.pipeline.Stager`)
is committed once the server holds its bytes (ETags), before they were checked against
the manifest's sha256: the commit is ``pending``. :class:`PendingVerifier` hashes its
files afterwards, in a thread of its own; only then is it marked verified (and may
retention delete older checkpoints for it). A file whose sha256 is not the manifest's
withdraws the commit. What the sync keeps (its committed steps, retention) is the
sync's: it is told through two callbacks, never changed here.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from daemon.layout import HASH_CHUNK
from daemon.storage.store import CheckpointStore, RemoteCheckpoint

log = structlog.get_logger(__name__)


class PendingVerifier:
    """Hashes the staged files of pending commits, one commit at a time, in a daemon thread.

    ``withdraw`` is called with a commit whose bytes are not its manifest's (the caller
    deletes it, manifest first); ``verified`` with a commit marked verified.
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        withdraw: Callable[[RemoteCheckpoint], None],
        verified: Callable[[RemoteCheckpoint], None],
    ) -> None:
        self._store = store
        self._withdraw = withdraw
        self._verified = verified
        # Pending commits whose staged files still need our sha256: (remote, dir, paths).
        self._queue: queue.Queue[tuple[RemoteCheckpoint, Path, tuple[str, ...]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, remote: RemoteCheckpoint, path: Path, files: tuple[str, ...]) -> None:
        """Queue the staged ``files`` of ``remote`` (in ``path``) to be hashed."""
        log.info("checkpoint_verification_queued", step=remote.step, files=len(files))
        self._queue.put((remote, path, files))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                # A daemon thread: a supervisor that exits does not wait for the hashing
                # (the commit then simply stays pending, and retention keeps older ones).
                self._thread = threading.Thread(
                    target=self._loop, name="checkpoint-verify", daemon=True
                )
                self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued pending commit has been hashed; whether all were."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _loop(self) -> None:
        while True:
            try:
                remote, path, files = self._queue.get(timeout=1.0)
            except queue.Empty:
                return
            try:
                self._verify(remote, path, files)
            except Exception as exc:  # never kill the thread; the commit stays pending
                log.warning("checkpoint_verification_failed", step=remote.step, error=str(exc))
            finally:
                self._queue.task_done()

    def _verify(self, remote: RemoteCheckpoint, path: Path, files: tuple[str, ...]) -> None:
        t0 = time.monotonic()
        entries = {e.path: e for e in remote.manifest.files}
        for rel in files:
            entry = entries[rel]
            h = hashlib.sha256()
            try:
                with open(path / rel, "rb") as f:
                    while chunk := f.read(HASH_CHUNK):
                        h.update(chunk)
            except FileNotFoundError:
                # Pruned locally (keep-K): cannot tell; restore still checks every sha256.
                log.warning(
                    "checkpoint_verification_skipped",
                    step=remote.step,
                    path=rel,
                    reason="local file gone; the commit stays pending",
                )
                return
            if h.hexdigest() != entry.sha256:
                # The bytes sent (the server's ETag matched them) are not the manifest's:
                # this commit would fail every restore. Withdraw it, manifest first.
                log.error(
                    "checkpoint_verification_failed",
                    step=remote.step,
                    path=rel,
                    reason="sha256 of the committed file differs from the manifest;"
                    " commit withdrawn",
                )
                self._withdraw(remote)
                return
        verified = self._store.mark_verified(remote)
        log.info(
            "checkpoint_sha256_verified",
            step=remote.step,
            files=len(files),
            bytes=sum(entries[r].size for r in files),
            seconds=round(time.monotonic() - t0, 3),
        )
        self._verified(verified)
