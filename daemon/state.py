"""The supervisor's state machine, and the ``state.json`` that ``status`` reads.

The phases, in the order a run goes through them::

    starting ──> restoring ──> training ──> draining ──> uploading ──> done
                    │  ▲          │  ▲                                  ▲
                    │  │          ▼  │                                  │
                    │  │        backoff (trainer crashed, or stopped     │
                    │  │          elsewhere; restart)                   │
                    ▼  │                                                │
                  standby (every slot held: restored, waiting) ─────────┤
                    └──────────────────────────── (complete.json) ───────┘
    any phase ──> failed (gave up: restarts exhausted, or an unrecoverable error)

``standby`` is a healthy supervisor that holds none of the run's slots (another
instance trains): it has restored the newest commit and waits to take a slot; on a
notice or a stop it exits 0 (``done``) without ever starting the trainer.

``training`` ends in ``draining`` on a notice or a stop (SIGTERM forwarded, drain clock
running), or straight in ``uploading`` when the trainer finished the run. ``uploading``
is the final commit. Every transition is one method call and one log line, and
rewrites ``state.json`` atomically.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Phase(str, enum.Enum):
    """Where the supervisor is; see the module docstring for the transitions."""

    STARTING = "starting"
    RESTORING = "restoring"
    TRAINING = "training"
    BACKOFF = "backoff"
    STANDBY = "standby"
    DRAINING = "draining"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"


_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.RESTORING}),
    Phase.RESTORING: frozenset(
        {Phase.TRAINING, Phase.DONE, Phase.DRAINING, Phase.UPLOADING, Phase.STANDBY}
    ),
    Phase.STANDBY: frozenset({Phase.RESTORING, Phase.DONE}),
    Phase.TRAINING: frozenset({Phase.DRAINING, Phase.UPLOADING, Phase.BACKOFF}),
    Phase.BACKOFF: frozenset({Phase.TRAINING, Phase.DRAINING, Phase.UPLOADING}),
    Phase.DRAINING: frozenset({Phase.UPLOADING}),
    Phase.UPLOADING: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
}


class TransitionError(RuntimeError):
    """A transition the state machine does not allow: a bug in the supervisor."""


@dataclass
class Snapshot:
    """What ``state.json`` holds (CONTRACT §5a keys first)."""

    phase: str = Phase.STARTING.value
    child_pid: int | None = None
    newest_local_step: int | None = None
    newest_committed_step: int | None = None
    last_upload_mbps: float | None = None
    last_notice: dict[str, Any] | None = None
    run_id: str = ""
    supervisor_pid: int = field(default_factory=os.getpid)
    restarts: int = 0
    drain_deadline: str | None = None
    phase_since: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


# state.json, the notice file and the metrics textfile hold no secrets, and are read by
# others: operators running `status`, the trainer (perhaps as run.user), node_exporter.
# Their modes are set explicitly, since the unit's UMask= (or a shell's 0077) would
# otherwise make them root's alone.
PUBLIC_FILE_MODE = 0o644
PUBLIC_DIR_MODE = 0o755


def make_public_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents searchable by all; existing dirs keep their mode."""
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs
        os.chmod(d, PUBLIC_DIR_MODE)  # mkdir's mode is cut by the umask; chmod's is not


def write_public_atomic(path: Path, text: str) -> None:
    """Write ``text`` so a reader sees the old file or the new one; mode 0644 whatever the umask.

    Staged under a dot name that no ``*.json`` or ``*.prom`` glob matches.
    """
    make_public_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), PUBLIC_FILE_MODE)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON so a reader sees the old file or the new one, never half of one."""
    write_public_atomic(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")


class StateMachine:
    """Owns the phase and the status fields; every change rewrites ``state.json``.

    ``on_phase`` is called after each transition (the supervisor uses it for systemd's
    ``STATUS=``). Thread-safe: the background sync updates committed steps from its thread.
    """

    def __init__(
        self,
        state_file: Path,
        run_id: str,
        on_phase: Callable[[Phase, str], None] | None = None,
    ) -> None:
        self._file = state_file
        self._lock = threading.Lock()
        self._snap = Snapshot(run_id=run_id)
        self._on_phase = on_phase
        self._write()

    @property
    def phase(self) -> Phase:
        return Phase(self._snap.phase)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(**asdict(self._snap))

    def transition(self, to: Phase, why: str, **fields: Any) -> None:
        """Move to ``to``; log ``phase_changed`` with the reason and any numbers given."""
        with self._lock:
            src = Phase(self._snap.phase)
            if to is not Phase.FAILED and to not in _ALLOWED[src]:
                raise TransitionError(f"{src.value} -> {to.value} is not a transition")
            self._snap.phase = to.value
            self._snap.phase_since = time.time()
            self._write_locked()
        log.info("phase_changed", phase=to.value, previous=src.value, why=why, **fields)
        if self._on_phase:
            self._on_phase(to, why)

    def update(self, **fields: Any) -> None:
        """Change status fields (not the phase) and rewrite the file when anything changed."""
        with self._lock:
            changed = False
            for k, v in fields.items():
                if not hasattr(self._snap, k) or k == "phase":
                    raise AttributeError(f"no status field {k!r}")
                if getattr(self._snap, k) != v:
                    setattr(self._snap, k, v)
                    changed = True
            if changed:
                self._write_locked()

    def _write(self) -> None:
        with self._lock:
            self._write_locked()

    def _write_locked(self) -> None:
        self._snap.updated_at = time.time()
        try:
            write_json_atomic(self._file, asdict(self._snap))
        except OSError as exc:
            # Status is for operators; never let a full or read-only runtime dir stop training.
            log.warning("state_file_unwritable", path=str(self._file), error=str(exc))


def read_state(state_file: Path) -> dict[str, Any]:
    """Read ``state.json`` for ``status``; raise FileNotFoundError when no daemon wrote one."""
    with open(state_file, encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc
