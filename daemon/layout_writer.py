"""Writing checkpoints to local disk: each file as ``<name>.partial``, fsynced and renamed;
the manifest last; the directory renamed into place (CONTRACT §4).

:class:`CheckpointWriter` builds one checkpoint; :func:`write_file` and
:class:`HashingWriter` write (and hash) one file of it, also for other processes that
write their part of one checkpoint. Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from daemon.layout_manifest import (
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    REASONS,
    TMP_PREFIX,
    FileEntry,
    Manifest,
    ManifestError,
    _safe_relpath,
    step_dir_name,
    utc_now_iso,
)
from daemon.layout_verify import load_complete
from daemon.libc import libc_function


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# sync_file_range(2)'s SYNC_FILE_RANGE_WRITE: start writeback of dirty pages, no waiting.
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Start writing ``length`` bytes at ``offset`` of ``fd`` to disk, without waiting.

    A file written piece by piece and fsynced at the end otherwise holds all its bytes
    dirty until that fsync, which then waits for every one of them (seconds for GBs,
    after the download it made durable). Started per piece, writeback overlaps the rest
    of the writing and the fsync waits for the last piece only. A hint: where the call
    is missing or fails, the fsync does all the work as before (and reports any error).
    Whether the kernel took it.
    """
    fn = libc_function(
        "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
    )
    return fn is not None and length > 0 and fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


class HashingWriter:
    """A binary file-like that hashes and counts what passes through it to a real file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self.size = 0
        # The OS error a write hit: serializers (torch.save's zip writer) may report it
        # as something else entirely, so the caller can name the real cause (ENOSPC).
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` through to the file, hashing and counting its bytes."""
        try:
            n = self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self._h.update(data)
        # nbytes, not len(): a memoryview of a typed buffer has len() in items, not bytes.
        self.size += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        """Flush the underlying file's buffer."""
        self._f.flush()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of everything written so far."""
        return self._h.hexdigest()


@contextlib.contextmanager
def write_file(directory: Path, name: str) -> Iterator[HashingWriter]:
    """Write ``<directory>/<name>`` as ``<name>.partial``, then fsync and rename it.

    A file under its final name is finished (CONTRACT §4). The yielded writer's
    ``size`` and ``sha256`` describe the file once the block is left. When the block
    raises, the ``.partial`` file is left for the caller's clean-up of ``directory``.
    """
    _safe_relpath(name)
    final = Path(directory) / name
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    with open(partial, "wb") as f:
        w = HashingWriter(f)
        yield w
        f.flush()
        os.fsync(f.fileno())
    os.rename(partial, final)


class CheckpointWriter:
    """Builds one checkpoint in a ``.tmp-`` directory and renames it into place.

    Used as a context manager: files are added with :meth:`open_file` (or
    :meth:`add_bytes`), :meth:`commit` writes the manifest and renames; leaving the
    block without a commit removes the temporary directory, so a failed save never
    leaves a ``step-*`` directory behind.
    """

    def __init__(
        self,
        local_dir: Path,
        run_id: str,
        step: int,
        reason: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if reason not in REASONS:
            raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")
        self.local_dir = Path(local_dir)
        self.run_id = run_id
        self.step = step
        self.reason = reason
        self.extra = dict(extra or {})
        self.final_dir = self.local_dir / step_dir_name(step)
        self.tmp_dir = (
            self.local_dir
            / f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}-{os.urandom(4).hex()}"
        )
        self._files: list[FileEntry] = []
        self.committed = False

    def __enter__(self) -> CheckpointWriter:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    @contextlib.contextmanager
    def open_file(self, name: str) -> Iterator[HashingWriter]:
        """Write one file as ``<name>.partial``; on success fsync and rename it to ``<name>``."""
        with write_file(self.tmp_dir, name) as w:
            yield w
        self._files.append(FileEntry(name, w.size, w.sha256))

    def add_files(self, entries: Iterable[FileEntry]) -> None:
        """List files another process finished in :attr:`tmp_dir` (through :func:`write_file`).

        For a checkpoint written by several processes (ranks of one distributed job):
        each writes its own files and reports their entries; the one holding this writer
        commits. Each file must exist under its final name with the reported size.
        """
        for entry in entries:
            path = self.tmp_dir / _safe_relpath(entry.path)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise ManifestError(f"{path} was reported written but is missing") from None
            if size != entry.size:
                raise ManifestError(f"{path} has {size} bytes, its writer reported {entry.size}")
            if any(f.path == entry.path for f in self._files):
                raise ManifestError(f"{entry.path} was written twice")
            self._files.append(entry)

    def add_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file from memory."""
        with self.open_file(name) as w:
            w.write(data)

    @property
    def files(self) -> tuple[FileEntry, ...]:
        """The files finished so far, in the order they were written."""
        return tuple(self._files)

    def commit(self) -> Manifest:
        """Write the manifest last, fsync, rename into place, fsync ``local_dir``."""
        manifest = Manifest(
            self.run_id, self.step, utc_now_iso(), self.reason, self.files, self.extra
        )
        with open(self.tmp_dir / (MANIFEST_NAME + PARTIAL_SUFFIX), "wb") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.rename(self.tmp_dir / (MANIFEST_NAME + PARTIAL_SUFFIX), self.tmp_dir / MANIFEST_NAME)
        # Renames inside sub-directories are durable only once those are fsynced too.
        for sub in sorted({Path(f.path).parent for f in self._files} - {Path(".")}):
            fsync_dir(self.tmp_dir / sub)
        fsync_dir(self.tmp_dir)
        if self.final_dir.exists():
            try:
                load_complete(self.final_dir, hash_files=False)
            except ManifestError:
                # Not a complete checkpoint (a crash or a corrupt copy): set it aside, so
                # this valid one can take its name; the next cleanup of .tmp- removes it.
                os.rename(self.final_dir, self.local_dir / f"{self.tmp_dir.name}-invalid")
            else:
                # A checkpoint of this step is already complete; never write inside it.
                raise FileExistsError(f"{self.final_dir} already exists and is complete")
        os.rename(self.tmp_dir, self.final_dir)
        fsync_dir(self.local_dir)
        self.committed = True
        return manifest
