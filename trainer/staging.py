"""Committing a directory another library wrote, as a checkpoint, without copying a byte.

What :meth:`trainer.CheckpointManager.save_directory` does for ``transformers.Trainer``,
Lightning and Accelerate (:mod:`trainer.integrations`): the library writes into a
``.tmp-staging-step-*`` directory (or its own output directory); every file is fsynced
there, out of the supervisor's sight; then one rename makes it a ``.tmp-step-*``
directory, so each file appears there under its final name already finished (CONTRACT
§4). Each file's sha256 is read back, the manifest written last, and the directory
renamed to ``step-<9 digits>``. Under ``torch.distributed`` (one node) the library writes
on every rank into rank 0's staging directory, and rank 0 commits.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch

from daemon.layout import (
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    CheckpointWriter,
    FileEntry,
    Manifest,
    fsync_dir,
    open_listed,
    step_dir_name,
    write_file,
)
from trainer.distributed import Ranks
from trainer.errors import CheckpointError, first_line
from trainer.localdir import ACTIVE_TMP_DIRS, STAGING_PREFIX, LocalCheckpoints
from trainer.state import FILE_SUFFIX, PROGRESS_KEY

# Bytes read at a time when hashing a committed file.
HASH_CHUNK = 4 << 20

# Writes a library's checkpoint into the (empty) directory it is given.
Fill = Callable[[Path], object]


@dataclass(frozen=True)
class Adoption:
    """One :meth:`~trainer.CheckpointManager.save_directory` call: what becomes ``step``.

    Either ``source`` (a finished directory, moved by one rename) or ``fill`` (called
    with an empty staging directory to write into); ``progress`` is added as
    ``progress.pt``; ``started`` (``time.monotonic()``) is when the save began.
    """

    directory: Path
    run_id: str
    step: int
    reason: str
    source: Path | None
    fill: Fill | None
    progress: Mapping[str, Any] | None
    started: float

    def staging_dir(self) -> Path:
        """Where the library's files are: ``source``, else a new, empty staging directory."""
        if self.source is not None:
            return self.source
        return new_staging_dir(self.directory, self.step)


def adopt(job: Adoption, local: LocalCheckpoints) -> tuple[Manifest, bool]:
    """Commit the directory as checkpoint ``job.step``; its manifest, False when it existed."""
    final_dir = job.directory / step_dir_name(job.step)
    existing = local.existing_complete(final_dir, job.step)
    if existing is not None:
        if job.source is not None:
            shutil.rmtree(job.source, ignore_errors=True)
        return existing, False
    staging = job.staging_dir()
    try:
        if job.fill is not None:
            job.fill(staging)
        if job.progress is not None:
            write_progress(staging, job.step, job.progress)
        extra = {"save_seconds": round(time.monotonic() - job.started, 3)}
        manifest = commit_staged(job, staging, extra)
    finally:
        ACTIVE_TMP_DIRS.discard(staging)
        if job.fill is not None:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when committed
    return manifest, True


def adopt_distributed(
    job: Adoption, local: LocalCheckpoints, ranks: Ranks
) -> tuple[Manifest, bool]:
    """:func:`adopt` on every rank: rank 0 stages and commits, ``fill`` runs everywhere."""
    if ranks.node_count > 1:
        # Every rank's files would have to reach rank 0's local_dir; a library's own
        # directory is not split by node as this manager's own saves are.
        raise CheckpointError(
            "save_directory serves one node: this job spans "
            f"{ranks.node_count} nodes (use the manager's own saves there)"
        )
    final_dir = job.directory / step_dir_name(job.step)
    opening: tuple[str, Any] | None = None
    staging: Path | None = None
    if ranks.is_writer:
        try:
            existing = local.existing_complete(final_dir, job.step)
            if existing is not None:
                opening = ("exists", existing)
            else:
                staging = job.staging_dir()
                opening = ("stage", str(staging))
        except Exception as exc:
            opening = ("error", f"rank 0: {first_line(exc)}")
    try:
        kind, value = ranks.broadcast(opening)
        if kind == "exists":
            if job.source is not None and ranks.is_writer:
                shutil.rmtree(job.source, ignore_errors=True)
            return cast(Manifest, value), False
        if kind == "error":
            raise CheckpointError(f"saving {final_dir.name} failed: {value}")
        problem: str | None = None
        if job.fill is not None:
            try:
                job.fill(Path(str(value)))
            except Exception as exc:
                problem = f"rank {ranks.rank}: {first_line(exc)}"
        problems = [p for p in ranks.gather(problem) if p]
        outcome: tuple[str, Any] | None = None
        if staging is not None:
            try:
                if problems:
                    raise CheckpointError("; ".join(problems))
                if job.progress is not None:
                    write_progress(staging, job.step, job.progress)
                extra = {
                    "save_seconds": round(time.monotonic() - job.started, 3),
                    "world_size": ranks.world_size,
                }
                manifest = commit_staged(job, staging, extra)
                outcome = ("ok", manifest)
            except Exception as exc:
                outcome = ("error", first_line(exc))
        kind, value = ranks.broadcast(outcome)
        if kind == "error":
            raise CheckpointError(f"saving {final_dir.name} failed: {value}")
        return cast(Manifest, value), True
    finally:
        if staging is not None:
            ACTIVE_TMP_DIRS.discard(staging)
            if job.fill is not None:
                shutil.rmtree(staging, ignore_errors=True)


def new_staging_dir(directory: Path, step: int) -> Path:
    """A fresh, empty ``.tmp-staging-step-*`` directory, registered as being written."""
    path = directory / (
        f"{STAGING_PREFIX}{step_dir_name(step)}-{os.getpid()}-{os.urandom(4).hex()}"
    )
    path.mkdir()
    ACTIVE_TMP_DIRS.add(path)
    return path


def write_progress(staging: Path, step: int, progress: Mapping[str, Any]) -> None:
    """``progress.pt``: the step and the loop's progress, as the manager's own saves hold it."""
    with write_file(staging, PROGRESS_KEY + FILE_SUFFIX) as f:
        torch.save({"step": step, **progress}, cast("IO[bytes]", f))


def commit_staged(job: Adoption, staging: Path, extra: dict[str, Any]) -> Manifest:
    """Move a finished staging directory into ``.tmp-step-*``, list it in a manifest, commit it.

    CONTRACT §4 by one rename instead of a copy: every file is fsynced while it is still
    out of the supervisor's sight, then the whole directory becomes ``.tmp-step-N-*``,
    so each file appears there under its final name already finished. Its sha256 is
    read back, the manifest written last, and the directory renamed to ``step-N``.
    """
    names = finished_files(staging)
    local_dir = job.directory
    writer = CheckpointWriter(local_dir, job.run_id, job.step, job.reason, extra)
    try:
        os.rename(staging, writer.tmp_dir)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise CheckpointError(
                f"{staging} is on another filesystem than {local_dir}: a checkpoint is moved "
                "there by a rename, never copied; put the library's output directory on the "
                "same filesystem (for example inside the checkpoint directory)"
            ) from None
        raise
    ACTIVE_TMP_DIRS.add(writer.tmp_dir)
    try:
        writer.add_files([_hash_listed(writer.tmp_dir, rel) for rel in names])
        return writer.commit()
    finally:
        ACTIVE_TMP_DIRS.discard(writer.tmp_dir)
        writer.__exit__(None, None, None)  # removes the directory unless committed


def _hash_listed(tmp_dir: Path, rel: str) -> FileEntry:
    """The manifest entry of ``tmp_dir/rel``, read (never through a symlink) and hashed."""
    h, size = hashlib.sha256(), 0
    with open_listed(tmp_dir, rel) as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(rel, size, h.hexdigest())


def finished_files(staging: Path) -> list[str]:
    """The files of a finished staging directory, fsynced; its sub-directories fsynced too.

    Only regular files and directories: a symlink could point anywhere (the supervisor
    would never upload through one, and loading would refuse it), so it is an error.
    """
    names: list[str] = []
    for root, dirs, files in os.walk(staging):
        here = Path(root)
        for name in sorted(dirs):
            if (here / name).is_symlink():
                raise CheckpointError(f"{here / name} is a symlink; a checkpoint holds files only")
        for name in sorted(files):
            path = here / name
            rel = path.relative_to(staging).as_posix()
            if rel == MANIFEST_NAME or name.endswith(PARTIAL_SUFFIX):
                raise CheckpointError(f"{path}: this name is reserved in a checkpoint")
            _fsync_regular(path)
            names.append(rel)
        fsync_dir(here)
    return sorted(names)


def _fsync_regular(path: Path) -> None:
    """fsync ``path``, refusing a symlink or anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symlink; a checkpoint holds files only") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path} is not a regular file")
        os.fsync(fd)
    finally:
        os.close(fd)
