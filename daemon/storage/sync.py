"""Background sync: commit each new complete local checkpoint to object storage.

inotify events are hints, rescans are truth: the watchdog handler only wakes the
worker, and the worker rescans ``local_dir`` at start, on every hint, every
``rescan_interval`` seconds, and once more in the final flush, because inotify can
drop events. The upload queue is the rescan's list of complete checkpoints not yet
committed, newest first. An older one superseded by a newer checkpoint is skipped when
bandwidth is short: when sending it would take longer than the trainer takes to write
the next checkpoint, and always in the final flush, where the deadline is near.

After each verified commit, remote retention keeps the newest ``keep_remote``
committed checkpoints (see :meth:`daemon.storage.store.CheckpointStore.apply_retention`).
During a drain, :meth:`CheckpointSync.begin_emergency` also starts the :class:`Stager`, which
uploads the files of the checkpoint being written before the writer has finished it.
Such a commit is checked against the server (ETags) but not yet against the manifest's
sha256: it is ``pending``, and a verifier thread hashes its staged files afterwards
(:mod:`daemon.storage.pending`); only then is it marked verified and may retention
delete older checkpoints for it. Server-side copies come only from verified commits.
Watching ``local_dir`` (watchdog) is :mod:`daemon.storage.fswatch`'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon import layout
from daemon.deadline import ThroughputEstimate
from daemon.memory import release_free_memory
from daemon.storage.errors import StoreError, UploadCancelled
from daemon.storage.fswatch import start_watch, stop_watch
from daemon.storage.global_commit import try_global_commit
from daemon.storage.pending import PendingVerifier
from daemon.storage.pipeline import Stager
from daemon.storage.store import CheckpointStore, RemoteCheckpoint

log = structlog.get_logger(__name__)


@dataclass
class SyncStats:
    """Counters for status and metrics."""

    newest_local_step: int | None = None
    newest_committed_step: int | None = None
    committed: int = 0
    bytes_uploaded: int = 0
    bytes_copied: int = 0
    upload_seconds: float = 0.0
    last_upload_mbps: float | None = None
    failures: int = 0


class FlushHandle:
    """A final flush running in its own thread, so the main loop keeps its clock."""

    def __init__(self, target: Callable[[], int | None], name: str = "final-flush") -> None:
        self.done = threading.Event()
        self.committed: int | None = None
        self.error: str | None = None
        self._target = target
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.committed = self._target()
        except Exception as exc:  # reported by the caller; the work itself logs details
            self.error = str(exc) or type(exc).__name__
        finally:
            self.done.set()


class CheckpointSync:
    """Keeps object storage up to date with ``local_dir``, from a worker thread."""

    def __init__(
        self,
        store: CheckpointStore,
        local_dir: Path,
        throughput: ThroughputEstimate,
        rescan_interval: float,
        on_change: Callable[[SyncStats], None] | None = None,
        *,
        keep_remote: int | None = None,
        stage_rescan_interval: float = 0.25,
        retention_allowed: Callable[[], bool] = lambda: True,
        on_commit: Callable[[RemoteCheckpoint, float], None] | None = None,
    ) -> None:
        self._store = store
        self._dir = local_dir
        self._throughput = throughput
        self._rescan_interval = rescan_interval
        self._on_change = on_change
        self._keep_remote = keep_remote
        self._retention_allowed = retention_allowed
        # Called (on the sync's thread) with each commit and its seconds: the run ledger.
        self._on_commit = on_commit
        self._hint = threading.Event()
        self._stopping = threading.Event()
        # One upload pass at a time: the worker's and the final flush never overlap.
        self._pass_lock = threading.Lock()
        self._committed: set[int] = set()
        # Multi-node: steps whose part this node uploaded, by incarnation, until the
        # global commit (written by whichever node completes the set) exists.
        self._parts: dict[int, str] = {}
        self._remote: dict[int, RemoteCheckpoint] = {}
        self._failed_at: dict[int, float] = {}
        self.stats = SyncStats()
        self.stager = Stager(store, local_dir, rescan_interval=stage_rescan_interval)
        self._observer: Any = None
        self._thread: threading.Thread | None = None
        self._verifier = PendingVerifier(store, withdraw=self._withdraw, verified=self._verified)

    # --- lifecycle -----------------------------------------------------------------

    def load_remote(self) -> None:
        """Learn what is already committed (called before the first pass)."""
        remote = self._store.list_committed()
        self._remote = {c.step: c for c in remote}
        self._committed = set(self._remote)
        self._set(newest_committed_step=max(self._committed, default=None))

    def start(self) -> None:
        """Watch ``local_dir`` and run the worker; the first pass is a full rescan."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._observer = start_watch(self._dir, self.wake, self.stager.hint)
        self._thread = threading.Thread(target=self._run, name="checkpoint-sync", daemon=True)
        self._thread.start()
        self.wake()

    def wake(self) -> None:
        """Rescan soon (from the watchdog handler, or anyone who knows of a new checkpoint)."""
        self._hint.set()

    def begin_emergency(self) -> None:
        """A drain began: stage the files of the checkpoint being written as they land.

        Starts threads only (no S3 I/O), so the main loop may call it.
        """
        self.stager.previous = self._newest_remote_below(layout.MAX_STEP + 1)
        self.stager.start()
        self.wake()

    def cancel(self, reason: str) -> int:
        """Stop every upload now (the notice deadline less the margin has come)."""
        return self._store.cancel_switch.cancel(reason)

    def stop(self) -> None:
        """Stop watching and let the worker finish its current upload."""
        self._stopping.set()
        self._hint.set()
        if self._observer is not None:
            stop_watch(self._observer)
            self._observer = None
        if self._thread is not None:
            self._thread.join()
        self.stager.stop()

    def restart_if_dead(self) -> bool:
        """Restart the worker if it died (not stopped): whether it had to.

        Its loop catches every Exception, so only something worse (a BaseException from
        a library, a bug in the loop itself) ends it; the main loop calls this so that
        even then commits do not silently stop for the rest of the run.
        """
        thread = self._thread
        if thread is None or thread.is_alive() or self._stopping.is_set():
            return False
        log.error("sync_thread_died", thread=thread.name, committed=self.stats.committed)
        self._thread = threading.Thread(target=self._run, name="checkpoint-sync", daemon=True)
        self._thread.start()
        self.wake()
        return True

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._hint.wait(timeout=self._rescan_interval)
            self._hint.clear()
            if self._stopping.is_set():
                break
            try:
                self.sync_pass(skip_superseded=True, reason="background")
            except Exception:  # a bug or an unforeseen error: log it, rescan later
                self.stats.failures += 1
                log.exception("sync_pass_failed")
            # An upload's buffers are freed by now: idle until the next, hold none of them.
            # Not while a drain stages parts: its next part would reuse that memory, and
            # pages handed back must be faulted in again.
            if not self.stager.active:
                release_free_memory()

    # --- the work ------------------------------------------------------------------

    def flush(self, skip_superseded: bool = True, wait_global_s: float = 0.0) -> int | None:
        """A final rescan and upload, in the caller's thread; the newest committed step.

        Whatever the stager holds for checkpoints that were never completed is then
        cancelled, and their unfinished multipart uploads aborted. ``wait_global_s``
        (multi-node): how long to wait for the peers' parts of this node's newest part,
        so that the global commit exists before we go (the cancel switch ends it early).
        """
        self.stager.stop()
        self.sync_pass(skip_superseded=skip_superseded, reason="flush", retry_failed=True)
        self._await_global(wait_global_s)
        cancelled = self._store.cancel_switch.cancelled
        self.stager.abandon("uploads cancelled" if cancelled else "checkpoint not completed")
        return self.stats.newest_committed_step

    def flush_async(self, wait_global_s: float = 0.0) -> FlushHandle:
        """Stop the worker and flush, in a thread of its own (the drain's final commit)."""

        def run() -> int | None:
            self.stop()
            return self.flush(skip_superseded=True, wait_global_s=wait_global_s)

        return FlushHandle(run)

    def sync_pass(self, skip_superseded: bool, reason: str, retry_failed: bool = False) -> None:
        """Rescan ``local_dir`` and commit what is complete and not yet remote, newest first."""
        with self._pass_lock:
            self._try_global_commits()
            local = layout.list_step_dirs(self._dir)
            self._set(newest_local_step=local[0][0] if local else None)
            queue = [
                (step, path)
                for step, path in local
                if step not in self._committed and step not in self._parts
            ]
            for i, (step, path) in enumerate(queue):
                if self._stopping.is_set() and reason == "background":
                    return
                if self._store.cancel_switch.cancelled:
                    log.warning(
                        "checkpoint_upload_cancelled",
                        step=step,
                        error=f"not started: {self._store.cancel_switch.reason}",
                    )
                    return
                if step in self._committed or step in self._parts or self._retired(step):
                    continue
                newest = max(self._committed, default=-1)
                superseded = i > 0 or step < newest
                if skip_superseded and superseded and self._bandwidth_short(step, path, local):
                    continue
                if not retry_failed and time.monotonic() - self._failed_at.get(step, -1e9) < 5:
                    continue
                self._commit(step, path)

    def _bandwidth_short(self, step: int, path: Path, local: list[tuple[int, Path]]) -> bool:
        """Whether to skip a superseded checkpoint; logs the numbers behind the decision."""
        try:
            nbytes = layout.read_manifest(path).total_bytes
        except (layout.ManifestError, OSError):
            nbytes = 0
        backlog = self._throughput.seconds_for(nbytes)
        interval = _save_interval(local)
        short = self._stopping.is_set() or interval is None or backlog > interval
        log.info(
            "checkpoint_superseded",
            step=step,
            newest_local=local[0][0] if local else None,
            newest_committed=max(self._committed, default=None),
            bytes=nbytes,
            backlog_s=round(backlog, 3),
            save_interval_s=None if interval is None else round(interval, 3),
            throughput_mbps=round(self._throughput.bytes_per_second / 1e6, 2),
            skipped=short,
        )
        return short

    def _newest_remote_below(self, step: int) -> RemoteCheckpoint | None:
        """The newest verified commit older than ``step``: the source of server-side copies
        (a pending one's bytes are not yet known to match its manifest's sha256)."""
        older = [s for s, c in list(self._remote.items()) if s < step and c.verified]
        return self._remote[max(older)] if older else None

    def _commit(self, step: int, path: Path) -> None:
        try:
            # Sizes only here: the store hashes every byte as it uploads and refuses a mismatch.
            manifest = layout.load_complete(path, hash_files=False)
        except FileNotFoundError:
            return  # pruned by the trainer's keep-K between the scan and now
        except layout.ManifestError as exc:
            log.warning("local_checkpoint_invalid", step=step, path=str(path), error=str(exc))
            return
        try:
            staged = self.stager.take(step, path, manifest)
            result = self._store.upload_checkpoint(
                path, manifest, previous=self._newest_remote_below(step), staged=staged
            )
        except FileNotFoundError:
            log.info("checkpoint_vanished", step=step, path=str(path))
            return
        except UploadCancelled as exc:
            self.stats.failures += 1
            log.warning("checkpoint_upload_cancelled", step=step, error=str(exc))
            return
        except Exception as exc:  # any failure: log it, keep going, retry later
            self._failed_at[step] = time.monotonic()
            self.stats.failures += 1
            log.warning("checkpoint_upload_failed", step=step, error=str(exc))
            return
        if not result.already_committed and result.bytes_sent:
            # Only what went over the wire in the commit says anything about bandwidth.
            self._throughput.record(result.bytes_sent, result.seconds)
        self.stats.bytes_uploaded += result.bytes_sent + result.bytes_staged
        self.stats.bytes_copied += result.bytes_copied
        self.stats.upload_seconds += result.seconds
        if result.seconds > 0:
            self._set(last_upload_mbps=round(result.mbps, 2))
        if result.part_of is not None:
            self._parts[step] = result.part_of  # committed when the set is complete
            return
        self._mark_committed(step, result.remote, result.seconds)
        if result.remote is not None and not result.remote.verified:
            self._verifier.put(result.remote, path, result.unverified)
            return
        self._apply_retention()

    def _mark_committed(
        self, step: int, remote: RemoteCheckpoint | None, seconds: float = 0.0
    ) -> None:
        self._committed.add(step)
        if remote is not None:
            self._remote[step] = remote
        self.stats.committed += 1
        self._set(newest_committed_step=max(self._committed))
        if remote is not None and self._on_commit is not None:
            self._on_commit(remote, seconds)

    # --- multi-node: the global commit ------------------------------------------------

    def _try_global_commits(self) -> None:
        """Commit the steps whose parts are now complete (caller holds the pass lock)."""
        newest = max(self._committed, default=-1)
        for step in sorted(self._parts, reverse=True):
            incarnation = self._parts[step]
            if step <= newest:
                del self._parts[step]  # superseded, or committed by a peer
                continue
            try:
                done = try_global_commit(self._store, step, incarnation)
            except StoreError as exc:
                log.warning("global_commit_failed", step=step, error=str(exc))
                continue
            if done is not None:
                del self._parts[step]
                self._mark_committed(step, done[0])
                newest = max(newest, step)
                self._apply_retention()

    def _await_global(self, timeout: float) -> None:
        """Wait (bounded, cancellable) for the global commit of this node's newest part."""
        if not self._parts or timeout <= 0:
            return
        deadline = time.monotonic() + timeout
        while self._parts and not self._store.cancel_switch.cancelled:
            with self._pass_lock:
                self._try_global_commits()
            if not self._parts or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        if self._parts:
            log.warning(
                "global_commit_not_complete",
                steps=sorted(self._parts),
                waited_s=round(timeout, 1),
                why="the other nodes' parts did not arrive in time",
            )

    def commit_parts_now(self) -> int | None:
        """Try the global commit of every part waiting for it; the newest committed step."""
        with self._pass_lock:
            self._try_global_commits()
        return self.stats.newest_committed_step

    def awaiting_global(self) -> dict[int, str]:
        """Steps with this node's part up, waiting for the others' (by incarnation)."""
        with self._pass_lock:
            return dict(self._parts)

    # --- verifying pending (emergency) commits ---------------------------------------

    def wait_verified(self, timeout: float | None = None) -> bool:
        """Wait until every queued pending commit has been hashed; whether all were."""
        return self._verifier.wait(timeout)

    def _withdraw(self, remote: RemoteCheckpoint) -> None:
        """A pending commit whose bytes are not its manifest's: delete it, manifest first."""
        with self._pass_lock:
            self._store.delete_checkpoint(remote.step)
            self._committed.discard(remote.step)
            self._remote.pop(remote.step, None)
            self._set(newest_committed_step=max(self._committed, default=None))

    def _verified(self, verified: RemoteCheckpoint) -> None:
        """A pending commit now checked against its manifest's sha256."""
        with self._pass_lock:
            if verified.step in self._remote:
                self._remote[verified.step] = verified
            self._apply_retention()

    def _apply_retention(self) -> None:
        if not self._keep_remote or self._store.cancel_switch.cancelled:
            return
        if not self._retention_allowed():
            return
        try:
            deleted = self._store.apply_retention(self._keep_remote)
        except StoreError as exc:
            log.warning("retention_failed", keep=self._keep_remote, error=str(exc))
            return
        for step in deleted:
            self._remote.pop(step, None)
            self._committed.discard(step)

    def _retired(self, step: int) -> bool:
        """Older than every checkpoint retention keeps: uploading it would only delete it."""
        if not self._keep_remote or len(self._committed) < self._keep_remote:
            return False
        return step < sorted(self._committed, reverse=True)[self._keep_remote - 1]

    def _set(self, **fields: Any) -> None:
        for k, v in fields.items():
            setattr(self.stats, k, v)
        if self._on_change:
            self._on_change(self.stats)

    @property
    def committed_steps(self) -> set[int]:
        """Steps committed (by this process or found committed at start)."""
        return set(self._committed)


def _save_interval(local: list[tuple[int, Path]]) -> float | None:
    """Seconds between the two newest local checkpoints (their directories' mtimes)."""
    if len(local) < 2:
        return None
    try:
        return max(local[0][1].stat().st_mtime - local[1][1].stat().st_mtime, 0.0)
    except FileNotFoundError:
        return None
