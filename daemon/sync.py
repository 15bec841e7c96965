"""Background sync: commit each new complete local checkpoint to object storage.

inotify events are hints, rescans are truth: the watchdog handler only wakes the
worker, and the worker rescans ``local_dir`` at start, on every hint, every
``rescan_interval`` seconds, and once more in the final flush, because inotify can
drop events. The newest checkpoint goes first; one older than the newest committed
one is superseded and skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon import layout
from daemon.deadline import ThroughputEstimate
from daemon.store import RemoteCheckpoint, UploadResult

log = structlog.get_logger(__name__)


class RemoteStore(Protocol):
    """What the sync needs of :class:`daemon.store.CheckpointStore`."""

    def list_committed(self) -> list[RemoteCheckpoint]: ...

    def upload_checkpoint(self, ckpt_dir: Path, manifest: layout.Manifest) -> UploadResult: ...


@dataclass
class SyncStats:
    """Counters for status and metrics."""

    newest_local_step: int | None = None
    newest_committed_step: int | None = None
    committed: int = 0
    bytes_uploaded: int = 0
    upload_seconds: float = 0.0
    last_upload_mbps: float | None = None
    failures: int = 0


class _Wake(FileSystemEventHandler):
    """Turns a checkpoint appearing under its final name into a rescan hint (no I/O here)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def _maybe(self, path: str | bytes) -> None:
        name = Path(path if isinstance(path, str) else path.decode()).name
        if layout.parse_step_dir(name) is not None:
            self._wake()

    def on_moved(self, event: FileSystemEvent) -> None:
        # The writer renames .tmp-step-N-* to step-N: that rename is the completion.
        self._maybe(event.dest_path)

    def on_created(self, event: FileSystemEvent) -> None:
        self._maybe(event.src_path)


class CheckpointSync:
    """Keeps object storage up to date with ``local_dir``, from a worker thread."""

    def __init__(
        self,
        store: RemoteStore,
        local_dir: Path,
        throughput: ThroughputEstimate,
        rescan_interval: float,
        on_change: Callable[[SyncStats], None] | None = None,
    ) -> None:
        self._store = store
        self._dir = local_dir
        self._throughput = throughput
        self._rescan_interval = rescan_interval
        self._on_change = on_change
        self._hint = threading.Event()
        self._stopping = threading.Event()
        # One upload pass at a time: the worker's and the final flush never overlap.
        self._pass_lock = threading.Lock()
        self._committed: set[int] = set()
        self._failed_at: dict[int, float] = {}
        self.stats = SyncStats()
        self._observer: Any = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------

    def load_remote(self) -> None:
        """Learn what is already committed (called before the first pass)."""
        self._committed = {c.step for c in self._store.list_committed()}
        self._set(newest_committed_step=max(self._committed, default=None))

    def start(self) -> None:
        """Watch ``local_dir`` and run the worker; the first pass is a full rescan."""
        self._dir.mkdir(parents=True, exist_ok=True)
        try:
            observer = Observer()
            observer.schedule(_Wake(self.wake), str(self._dir), recursive=False)
            observer.start()
            self._observer = observer
        except OSError as exc:
            # Out of inotify watches, say: periodic rescans still find every checkpoint.
            log.warning("sync_watch_unavailable", path=str(self._dir), error=str(exc))
        self._thread = threading.Thread(target=self._run, name="checkpoint-sync", daemon=True)
        self._thread.start()
        self.wake()

    def wake(self) -> None:
        self._hint.set()

    def stop(self) -> None:
        """Stop watching and let the worker finish its current upload."""
        self._stopping.set()
        self._hint.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._hint.wait(timeout=self._rescan_interval)
            self._hint.clear()
            if self._stopping.is_set():
                break
            self.sync_pass(skip_superseded=True, reason="background")

    # --- the work ------------------------------------------------------------------

    def flush(self, skip_superseded: bool = True) -> int | None:
        """A final rescan and upload, in the caller's thread; the newest committed step."""
        self.sync_pass(skip_superseded=skip_superseded, reason="flush", retry_failed=True)
        return self.stats.newest_committed_step

    def sync_pass(self, skip_superseded: bool, reason: str, retry_failed: bool = False) -> None:
        """Rescan ``local_dir`` and commit what is complete and not yet remote, newest first."""
        with self._pass_lock:
            local = layout.list_step_dirs(self._dir)
            self._set(newest_local_step=local[0][0] if local else None)
            for step, path in local:
                if self._stopping.is_set() and reason == "background":
                    return
                if step in self._committed:
                    continue
                newest = max(self._committed, default=-1)
                if skip_superseded and step < newest:
                    log.info("checkpoint_superseded", step=step, newest_committed=newest)
                    continue
                if not retry_failed and time.monotonic() - self._failed_at.get(step, -1e9) < 5:
                    continue
                self._commit(step, path)

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
            result = self._store.upload_checkpoint(path, manifest)
        except FileNotFoundError:
            log.info("checkpoint_vanished", step=step, path=str(path))
            return
        except Exception as exc:  # any failure: log it, keep going, retry later
            self._failed_at[step] = time.monotonic()
            self.stats.failures += 1
            log.warning("checkpoint_upload_failed", step=step, error=str(exc))
            return
        self._committed.add(step)
        self._throughput.record(result.bytes, result.seconds)
        mbps = result.bytes / result.seconds / 1e6 if result.seconds > 0 else None
        self.stats.committed += 1
        self.stats.bytes_uploaded += result.bytes
        self.stats.upload_seconds += result.seconds
        self._set(
            newest_committed_step=max(self._committed),
            last_upload_mbps=round(mbps, 2) if mbps is not None else None,
        )

    def _set(self, **fields: Any) -> None:
        for k, v in fields.items():
            setattr(self.stats, k, v)
        if self._on_change:
            self._on_change(self.stats)

    @property
    def committed_steps(self) -> set[int]:
        return set(self._committed)
