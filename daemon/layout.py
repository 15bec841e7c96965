"""The checkpoint layout on local disk and in object storage (CONTRACT §4, §5).

This module is the single definition of that format. It depends on the standard
library only, so the training library (which must not import boto3) and the
supervisor (which must not import torch) can both use it.

A checkpoint is complete exactly when ``<local_dir>/step-<9 digits>/`` exists and its
``manifest.json`` validates. Writers build it in ``.tmp-step-<9 digits>-<anything>/``,
write each file as ``<name>.partial`` then fsync and rename it, write the manifest
last, fsync the directory, rename it into place, and fsync ``local_dir``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "spot-checkpoint/1"
PARTIAL_SUFFIX = ".partial"
TMP_PREFIX = ".tmp-"
REASONS = ("periodic", "interrupt", "requested", "final")
STEP_DIGITS = 9
MAX_STEP = 10**STEP_DIGITS - 1

_STEP_DIR_RE = re.compile(r"^step-(\d{9})$")
_TMP_DIR_RE = re.compile(r"^\.tmp-step-(\d{9})-.+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
HASH_CHUNK = 4 * 1024 * 1024  # bytes read at a time to hash a file (daemon and trainer)
# The most a manifest may weigh (about half a million files): a larger one, local or
# remote, is never read into memory, and so is never a checkpoint.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# NAME_MAX of ext4, xfs, btrfs and tmpfs; a file is written as ``<name>.partial`` first.
_NAME_MAX = 255
# No S3 key is longer, so no remote checkpoint can list a longer path.
_PATH_MAX = 1024


class ManifestError(ValueError):
    """A manifest (or the files it lists) does not match the format or the bytes."""


class UnsafePathError(ManifestError):
    """A listed file is reached through a symlink, or is not a regular file."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, path relative to the checkpoint directory."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of one checkpoint."""

    run_id: str
    step: int
    created_at: str
    reason: str
    files: tuple[FileEntry, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of all listed files (the manifest itself excluded)."""
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        """The manifest as written to disk and to object storage."""
        doc: dict[str, Any] = dict(self.extra)
        doc.update(
            {
                "format": MANIFEST_FORMAT,
                "run_id": self.run_id,
                "step": self.step,
                "created_at": self.created_at,
                "reason": self.reason,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            }
        )
        return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


def step_dir_name(step: int) -> str:
    """``step-000001200`` for step 1200."""
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step {step} is outside 0..{MAX_STEP}")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a complete checkpoint's directory name, else None."""
    m = _STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def parse_tmp_dir(name: str) -> int | None:
    """The step of a writer's ``.tmp-step-<9 digits>-<anything>`` directory, else None."""
    m = _TMP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def utc_now_iso() -> str:
    """Now as ISO 8601 UTC with a ``Z``, second precision."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _show(path: str) -> str:
    # Paths come from manifests anyone may have written: keep log lines short.
    return repr(path if len(path) <= 80 else path[:60] + "..." + path[-12:])


def _safe_relpath(path: Any) -> str:
    # A manifest comes from disk or from a bucket: never let it name a file outside the
    # checkpoint directory, nor one this path could not be written as on any common Linux
    # filesystem. Only the canonical spelling is allowed (no empty or "." components), so
    # one path names one file: "a//b" and "a/b" may not both be listed.
    if not isinstance(path, str) or not path:
        raise ManifestError(f"file path {path!r} is not a non-empty string")
    if "\x00" in path or "\\" in path or path.startswith("/"):
        raise ManifestError(f"file path {_show(path)} is not a plain relative path")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ManifestError(f"file path {_show(path)} is not a plain relative path")
    try:
        encoded = [part.encode() for part in parts]
    except UnicodeEncodeError:
        raise ManifestError(f"file path {_show(path)} is not valid UTF-8") from None
    longest = max(len(part) for part in encoded)
    if longest + len(PARTIAL_SUFFIX) > _NAME_MAX:
        raise ManifestError(
            f"file path {_show(path)} has a name of {longest} bytes: too long for a file name "
            f"(at most {_NAME_MAX - len(PARTIAL_SUFFIX)})"
        )
    if len(path.encode()) > _PATH_MAX:
        raise ManifestError(f"file path {_show(path)} is too long (over {_PATH_MAX} bytes)")
    if path == MANIFEST_NAME or path.endswith(PARTIAL_SUFFIX):
        raise ManifestError(f"file path {_show(path)} uses a reserved name")
    return path


def _check_file_dir_conflicts(paths: Iterable[str]) -> None:
    """No listed path may also be a directory of another (``a`` and ``a/b``)."""
    files = set(paths)
    for path in files:
        parent, sep, _ = path.rpartition("/")
        while sep:
            if parent in files:
                raise ManifestError(
                    f"manifest lists {_show(parent)} as a file and as the directory of "
                    f"{_show(path)}"
                )
            parent, sep, _ = parent.rpartition("/")


def parse_manifest(raw: bytes | str, *, expect_step: int | None = None) -> Manifest:
    """Parse and validate a manifest document; raise ManifestError naming what is wrong."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    if doc.get("format") != MANIFEST_FORMAT:
        raise ManifestError(
            f"manifest format is {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}"
        )
    run_id, step, created_at, reason = (
        doc.get("run_id"),
        doc.get("step"),
        doc.get("created_at"),
        doc.get("reason"),
    )
    if not isinstance(run_id, str) or not run_id:
        raise ManifestError("manifest run_id is missing or not a string")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise ManifestError(f"manifest step {step!r} is not an integer in 0..{MAX_STEP}")
    if expect_step is not None and step != expect_step:
        raise ManifestError(
            f"manifest step {step} does not match its directory (step {expect_step})"
        )
    if not isinstance(created_at, str):
        raise ManifestError("manifest created_at is missing or not a string")
    if reason not in REASONS:
        raise ManifestError(f"manifest reason {reason!r} is not one of {', '.join(REASONS)}")
    files_raw = doc.get("files")
    if not isinstance(files_raw, list):
        raise ManifestError("manifest files is missing or not a list")
    files: list[FileEntry] = []
    seen: set[str] = set()
    for i, entry in enumerate(files_raw):
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest files[{i}] is not an object")
        path = _safe_relpath(entry.get("path"))
        size, sha = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"manifest files[{i}] ({path}) size {size!r} is not a size")
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise ManifestError(f"manifest files[{i}] ({path}) sha256 is not 64 lower-case hex")
        if path in seen:
            raise ManifestError(f"manifest lists {path} twice")
        seen.add(path)
        files.append(FileEntry(path, size, sha))
    _check_file_dir_conflicts(seen)
    known = {"format", "run_id", "step", "created_at", "reason", "files"}
    extra = {k: v for k, v in doc.items() if k not in known}
    return Manifest(run_id, step, created_at, reason, tuple(files), extra)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in large chunks."""
    with open(path, "rb") as f:
        return _sha256_of(f)


def _sha256_of(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(HASH_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def open_listed(ckpt_dir: Path, rel: str) -> BinaryIO:
    """Open the file ``rel`` of a checkpoint for reading, never through a symlink.

    Every component of ``rel`` is opened relative to the one before with ``O_NOFOLLOW``,
    so neither the file nor a directory above it inside ``ckpt_dir`` may be a symlink
    (one could lead anywhere: ``/etc``, another run's checkpoints). ``ckpt_dir`` itself
    is opened normally: ``local_dir`` may well sit on a symlinked mount. The file must
    be a regular file (a FIFO would block the reader forever). Raises
    :class:`UnsafePathError` naming the file; ``FileNotFoundError`` when it is missing.
    """
    parts = rel.split("/")
    fd = os.open(ckpt_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            flags |= os.O_NONBLOCK if last else os.O_DIRECTORY
            try:
                nxt = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(name, fd):
                    where = "/".join(parts[: i + 1])
                    raise UnsafePathError(
                        f"{ckpt_dir / rel} is reached through the symlink {ckpt_dir / where}; "
                        "a listed file must be a regular file inside the checkpoint"
                    ) from None
                raise
            os.close(fd)
            fd = nxt
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{ckpt_dir / rel} is not a regular file")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def verify_files(ckpt_dir: Path, manifest: Manifest, *, hash_files: bool = True) -> None:
    """Check every listed file exists with its size (and sha256 when ``hash_files``).

    A file reached through a symlink is not part of a checkpoint (:func:`open_listed`).
    """
    for entry in manifest.files:
        p = ckpt_dir / entry.path
        try:
            with open_listed(ckpt_dir, entry.path) as f:
                size = os.fstat(f.fileno()).st_size
                if size != entry.size:
                    raise ManifestError(f"{p} has {size} bytes, the manifest says {entry.size}")
                if hash_files and _sha256_of(f) != entry.sha256:
                    raise ManifestError(f"{p} does not match its sha256 in the manifest")
        except FileNotFoundError:
            raise ManifestError(f"{p} is listed in the manifest but missing") from None
        except OSError as exc:
            # Unreadable (permissions, I/O error): not a checkpoint anyone could use. A
            # ManifestError, so callers that skip invalid checkpoints skip this one too.
            raise ManifestError(f"cannot read {p}: {exc.strerror or exc}") from exc


def read_manifest(ckpt_dir: Path) -> Manifest:
    """Read and validate ``<ckpt_dir>/manifest.json`` (format only, not the files)."""
    step = parse_step_dir(ckpt_dir.name)
    try:
        with open_listed(ckpt_dir, MANIFEST_NAME) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(f"{ckpt_dir} has no {MANIFEST_NAME}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{ckpt_dir / MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes; not read"
        )
    return parse_manifest(raw, expect_step=step)


def load_complete(ckpt_dir: Path, *, hash_files: bool = True) -> Manifest:
    """The manifest of a complete checkpoint; ManifestError when it is not one."""
    manifest = read_manifest(ckpt_dir)
    verify_files(ckpt_dir, manifest, hash_files=hash_files)
    return manifest


def list_step_dirs(local_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-*`` directory, newest first (not yet validated)."""
    try:
        entries = list(os.scandir(local_dir))
    except FileNotFoundError:
        return []
    found = []
    for e in entries:
        step = parse_step_dir(e.name)
        if step is not None and e.is_dir(follow_symlinks=False):
            found.append((step, Path(e.path)))
    found.sort(reverse=True)
    return found


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
