"""Keeping ``local_dir`` in order: which checkpoints are usable, and removing the rest.

* :class:`LocalCheckpoints` remembers which ``step-*`` directories this process found
  good (hashes checked, or written by it, and its files loaded) and which do not load,
  so that saving and pruning need not hash them again; it replaces a broken checkpoint
  in the way of a save, sets aside one a save replaces, and prunes old ones
  (``keep``).
* :func:`sweep_stale_tmp_dirs` removes ``.tmp-step-*``, ``.tmp-staging-step-*`` and DCP
  scratch directories whose writer process is gone; :data:`ACTIVE_TMP_DIRS` names the
  ones this process is writing right now, which the sweep leaves alone.

A ``step-*`` directory is removed by renaming it out of the ``step-*`` namespace first
(:func:`remove_dir`), so nobody ever sees a half-deleted checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from daemon.layout import (
    TMP_PREFIX,
    Manifest,
    ManifestError,
    list_step_dirs,
    load_complete,
    parse_tmp_dir,
    read_manifest,
    step_dir_name,
)
from trainer import sharded
from trainer.state import LOGGER

log = logging.getLogger(LOGGER)

# Where another library writes a checkpoint before it is moved, by one rename, into a
# ``.tmp-step-`` directory (:meth:`CheckpointManager.save_directory`). Not a ``.tmp-step-``
# name: the supervisor uploads files from those as soon as they carry their final name,
# and a library writing in place gives its files their final names while still writing.
STAGING_PREFIX = TMP_PREFIX + "staging-"
_STAGING_RE = re.compile(r"^\.tmp-staging-step-\d{9}-(\d+)-.+$")

# Temporary directories this process is writing right now. The stale-directory sweep
# skips them even though they carry our own pid (a second manager in one process).
ACTIVE_TMP_DIRS: set[Path] = set()


class LocalCheckpoints:
    """What this process knows of the complete checkpoints in its ``local_dir``."""

    def __init__(self) -> None:
        # Checkpoints whose hashes we checked (or wrote) and whose files loaded, and
        # ones whose files did not: saves and pruning use both instead of re-hashing.
        self.known_good: set[Path] = set()
        self.unloadable: set[Path] = set()

    def forget(self, path: Path) -> None:
        """``path`` is gone (or replaced): nothing is known of it any more."""
        self.known_good.discard(path)
        self.unloadable.discard(path)

    def existing_complete(self, final_dir: Path, step: int) -> Manifest | None:
        """The manifest of a usable checkpoint already at ``final_dir``; clears a broken one."""
        if not final_dir.exists():
            return None
        if final_dir in self.known_good:
            return read_manifest(final_dir)
        problem: str
        if final_dir in self.unloadable:
            problem = "its files do not load"
        else:
            try:
                return load_complete(final_dir)
            except (ManifestError, OSError) as exc:
                problem = str(exc)
        # Not complete, so not a checkpoint by the contract: replacing it writes nothing
        # inside a complete checkpoint, and leaving it would block this step forever.
        log.warning("replacing broken checkpoint %s (%s)", final_dir, problem)
        remove_dir(final_dir, step, "broken")
        self.unloadable.discard(final_dir)
        return None

    def set_aside(self, final_dir: Path, step: int) -> None:
        """Remove a complete checkpoint that this save replaces (renamed out first)."""
        remove_dir(final_dir, step, "aside")
        self.forget(final_dir)

    def prune(self, directory: Path, keep: int | None) -> None:
        """Delete ``step-*`` directories older than the newest ``keep`` complete ones."""
        if keep is None:
            return
        complete = 0
        for step, path in list_step_dirs(directory):
            if complete >= keep:
                log.info("pruning old checkpoint %s", path.name)
                try:
                    remove_dir(path, step, "pruned")
                except OSError as exc:
                    log.warning("could not prune %s: %s", path, exc)
                self.forget(path)
            elif path in self.known_good:
                complete += 1
            elif path not in self.unloadable:
                # Sizes only: hashing every old checkpoint at every save costs a full
                # read of each; loading still verifies every hash before trusting one.
                try:
                    load_complete(path, hash_files=False)
                except (ManifestError, OSError):
                    continue
                complete += 1


def remove_dir(path: Path, step: int, tag: str) -> None:
    """Rename a directory out of the ``step-*`` namespace, then delete it.

    The rename is atomic, so nobody ever sees a half-deleted ``step-*`` directory;
    a crash during the rmtree leaves a ``.tmp-`` directory the next sweep removes.
    """
    doomed = path.with_name(
        f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}-{tag}{os.urandom(4).hex()}"
    )
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_stale_tmp_dirs(directory: Path) -> None:
    """Remove ``.tmp-step-*`` (and DCP scratch) directories whose writer process is gone."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    me = os.getpid()
    for entry in entries:
        scratch = sharded.scratch_pid(entry.name)
        pid = _tmp_dir_pid(entry.name) if scratch is None else scratch
        if pid is None or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if scratch is not None and pid == me:
            continue  # DCP scratch is not registered as active: never sweep our own
        if pid == me:
            # Our pid but not being written by us: a previous process that had the
            # same pid (common in containers) died mid-save.
            if path in ACTIVE_TMP_DIRS:
                continue
        elif _pid_alive(pid):
            continue  # a live writer (another trainer, or the supervisor restoring)
        log.info("removing %s left by dead writer pid %d", entry.name, pid)
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # os.kill(0, ...) would address our whole process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _tmp_dir_pid(name: str) -> int | None:
    """The writer pid in ``.tmp-step-<9 digits>-<pid>-<anything>`` (or a staging dir), else None."""
    staging = _STAGING_RE.match(name)
    if staging is not None:
        return int(staging.group(1))
    if parse_tmp_dir(name) is None:
        return None
    rest = name[len(TMP_PREFIX) + len("step-") + 10 :]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None
