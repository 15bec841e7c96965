"""Reading checkpoints from local disk: the listing of ``step-*`` directories, the manifest
read safely, and every listed file checked against it (size, SHA-256).

A file is only ever opened through :func:`open_listed`, never through a symlink. What a
manifest must say is :mod:`daemon.layout_manifest`. Standard library only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from daemon.layout_manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    UnsafePathError,
    parse_manifest,
    parse_step_dir,
)

HASH_CHUNK = 4 * 1024 * 1024  # bytes read at a time to hash a file (daemon and trainer)


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
