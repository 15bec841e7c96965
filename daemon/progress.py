"""What the trainer has left on the local disk: its newest checkpoint, and its progress.

Read from the disk itself (one directory listing), the moment a checkpoint lands: not
from the sync, whose passes may start minutes later behind a slow upload and would get
a healthy trainer killed as hung. Nothing here signals or kills anything: what an
overdue trainer means is :func:`daemon.policy.on_hang`'s, and the supervisor acts on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from daemon import layout


def newest_local_checkpoint(local_dir: Path) -> tuple[int, layout.Manifest] | None:
    """The newest complete local checkpoint (sizes checked, not hashes) and its manifest."""
    for step, path in layout.list_step_dirs(local_dir):
        try:
            return step, layout.load_complete(path, hash_files=False)
        except (layout.ManifestError, OSError):
            continue
    return None


def newest_local_bytes(local_dir: Path) -> int:
    """Bytes of the newest complete local checkpoint: the emergency one will be about as big."""
    newest = newest_local_checkpoint(local_dir)
    return newest[1].total_bytes if newest is not None else 0


def _newest_step(local_dir: Path) -> int | None:
    local = layout.list_step_dirs(local_dir)
    return local[0][0] if local else None


class ProgressWatch:
    """The running trainer's progress: the newest local step, and when it last changed.

    ``timeout`` is ``daemon.progress_timeout`` (0: the hang check is off);
    ``on_first_step`` is told the first new step after each start (the run ledger).
    """

    def __init__(
        self, local_dir: Path, timeout: float, on_first_step: Callable[[int], None]
    ) -> None:
        self._local_dir = local_dir
        self.timeout = timeout
        self._on_first_step = on_first_step
        self.step: int | None = None
        self._at = time.monotonic()
        # The newest local step when the running trainer started: did it get anywhere?
        self.start_step: int | None = None
        self._first_step_pending = False

    def started(self) -> int | None:
        """A trainer started: its progress is counted from now (the restore and a backoff
        are not the trainer's). Returns the newest local step it starts from."""
        self._at = time.monotonic()
        self.start_step = self.step = _newest_step(self._local_dir)
        self._first_step_pending = True
        return self.start_step

    def observe(self) -> None:
        """A new step directory on the local disk is the trainer's progress."""
        step = _newest_step(self._local_dir)
        if step is not None and (self.step is None or step > self.step):
            self.step, self._at = step, time.monotonic()
            if self._first_step_pending:
                self._first_step_pending = False
                self._on_first_step(step)

    def progressed(self, step: int) -> bool:
        """Whether ``step`` is newer than the step the trainer started from."""
        return self.start_step is None or step > self.start_step

    def due_at(self) -> float | None:
        """Monotonic time the hang check is due (None: the check is off)."""
        return self._at + self.timeout if self.timeout else None

    def overdue(self) -> float | None:
        """Seconds without a new checkpoint, once past the timeout (None while within
        it, or with the check off)."""
        if not self.timeout:
            return None
        quiet = time.monotonic() - self._at
        return quiet if quiet >= self.timeout else None
