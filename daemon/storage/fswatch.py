"""File-system events into hints for the background sync and the emergency stager.

inotify events are hints, rescans are truth: the handler here only wakes the sync's
worker or the stager, never does any I/O itself, and whoever it wakes rescans
``local_dir`` (which also finds whatever events were dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon import layout

log = structlog.get_logger(__name__)


class _Wake(FileSystemEventHandler):
    """Turns file-system events into hints (no I/O here).

    A checkpoint appearing under its final name wakes the sync; a file appearing inside
    a ``.tmp-step-*`` directory wakes the stager: a ``.partial`` one to be followed as it
    is written, one under its final name to be completed or sent.
    """

    def __init__(self, wake: Callable[[], None], stage: Callable[[], None]) -> None:
        self._wake = wake
        self._stage = stage

    def _maybe(self, path: str | bytes) -> None:
        p = Path(path if isinstance(path, str) else path.decode())
        if layout.parse_step_dir(p.name) is not None:
            self._wake()
        elif any(layout.parse_tmp_dir(part) is not None for part in p.parts[-8:-1]):
            self._stage()

    def on_moved(self, event: FileSystemEvent) -> None:
        # The writer renames .tmp-step-N-* to step-N (the completion), and each
        # <name>.partial to <name> (that file is final).
        self._maybe(event.dest_path)

    def on_created(self, event: FileSystemEvent) -> None:
        self._maybe(event.src_path)


def start_watch(local_dir: Path, wake: Callable[[], None], stage: Callable[[], None]) -> Any:
    """Watch ``local_dir`` for ``wake`` (a checkpoint completed) and ``stage`` (a file
    landed in one being written); the observer, or None when watching is not possible."""
    try:
        observer = Observer()
        # Recursive: the stager needs the files finished inside .tmp-step-* dirs.
        observer.schedule(_Wake(wake, stage), str(local_dir), recursive=True)
        observer.start()
        return observer
    except OSError as exc:
        # Out of inotify watches, say: periodic rescans still find every checkpoint.
        log.warning("sync_watch_unavailable", path=str(local_dir), error=str(exc))
        return None


def stop_watch(observer: Any) -> None:
    """Stop an observer of :func:`start_watch` (waiting a little for its thread)."""
    observer.stop()
    observer.join(timeout=5)
