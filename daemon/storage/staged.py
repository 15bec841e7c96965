"""What the emergency pipeline has staged, and whether the commit may use it.

:class:`~daemon.storage.pipeline.Stager` records each file it sends while a checkpoint is
being written (:class:`Staged`, grouped by the writer's directory in :class:`TmpDir`).
At the commit, :func:`check_staged` and :func:`check_tail` decide, file by file, whether
what was sent is exactly what the manifest lists: staged from the directory that was
renamed into place, the same file since (inode, size, mtime), the manifest's size, and
bytes whose sha256 (or ETag) is known to match. Anything else is sent again by the
commit, never committed wrong. No I/O here beyond ``lstat`` and waiting for uploads.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import layout
from daemon.storage.s3client import EtagDigest, StoreError, UploadCancelled
from daemon.storage.store import CheckpointStore, StagedFile
from daemon.storage.tail import TailUpload


def file_ident(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class Staged:
    """One file being staged: its upload (or copy), and what its stored bytes must be."""

    rel: str
    key: str
    ident: tuple[int, int, int]
    # Our sha256 of the file ("" when not hashed: the upload's digest checks it instead);
    # for a copy candidate it also copies the file or submits its upload.
    job: Future[str]
    transfer: Any = None  # the transfer future, once submitted
    copied: bool = False
    digest: EtagDigest | None = None  # fed by the upload's own reads
    etag: str | None = None  # the stored object's ETag must be this (copies, hashed files)
    tail: TailUpload | None = None  # sent while it was written (see daemon.storage.tail)


@dataclass
class TmpDir:
    """One writer's ``.tmp-step-N-*`` directory (by inode: it is renamed into place) and
    what of it is staged."""

    path: Path
    step: int
    ino: int
    files: dict[str, Staged] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)  # symlinks and the like, warned once


def check_staged(
    store: CheckpointStore,
    staged: Staged,
    entry: layout.FileEntry | None,
    ckpt_dir: Path,
    same_dir: bool,
) -> StagedFile | str:
    """What the commit needs of a staged file, or why it cannot be part of it."""
    if staged.tail is not None:
        return check_tail(staged.tail, staged.rel, entry, ckpt_dir, same_dir)
    try:
        digest = staged.job.result()
    except UploadCancelled:
        raise
    except (StoreError, OSError) as exc:
        settle(store, staged)
        return f"staging failed: {exc}"
    if staged.transfer is not None:
        try:
            store.wait_upload(staged.transfer, staged.key, staged.ident[1])
        except UploadCancelled:
            raise
        except (StoreError, OSError) as exc:
            return f"upload failed: {exc}"
    elif not staged.copied:
        return "not uploaded"
    if entry is None:
        return "not in the manifest"
    if not same_dir:
        return "staged from another directory"
    try:
        now = file_ident((ckpt_dir / staged.rel).lstat())  # a symlink now is another file
    except FileNotFoundError:
        return "file gone"
    if now != staged.ident:
        return "file changed since it was staged"
    if entry.size != staged.ident[1]:
        return "size differs from the manifest"
    if digest and digest != entry.sha256:
        return "sha256 differs from the manifest"
    etag = staged.etag
    if staged.digest is not None:
        etag = staged.digest.etag()
        if etag is None:
            return "the upload did not read every byte once in order (ETag unknown)"
    return StagedFile(entry.size, etag, sha256_checked=bool(digest))


def check_tail(
    tail: TailUpload,
    rel: str,
    entry: layout.FileEntry | None,
    ckpt_dir: Path,
    same_dir: bool,
) -> StagedFile | str:
    """A tail upload usable for the commit: the file under its final name in
    ``ckpt_dir`` is the one followed, unchanged since its upload completed, and every
    byte sent hashes to the manifest's sha256."""
    why: str | None = None
    final = ckpt_dir / rel
    if entry is None:
        why = "not in the manifest"
    elif not same_dir:
        why = "staged from another directory"
    else:
        try:
            if final.lstat().st_ino != tail.ino:
                why = "file changed since it was staged"  # another file under its name
        except FileNotFoundError:
            why = "file gone"
    if why is not None:
        tail.abandon(why)
        return why
    tail.finish_at(final)
    try:
        # Bounded by the cancel switch, which stops the tail at the drain deadline.
        res = tail.result()
    except UploadCancelled:
        raise
    except StoreError as exc:
        return f"tail upload failed: {exc}"
    assert entry is not None
    try:
        now = file_ident(final.lstat())
    except FileNotFoundError:
        return "file gone"
    if now != res.ident:
        return "file changed since it was staged"
    if entry.size != res.size:
        return "size differs from the manifest"
    if res.sha256 != entry.sha256:
        return "sha256 differs from the manifest"
    return StagedFile(entry.size, res.etag, sha256_checked=True, etag_served=res.server_verified)


def settle(store: CheckpointStore, staged: Staged) -> None:
    if staged.transfer is not None:
        if not staged.transfer.done():
            staged.transfer.cancel()
        with contextlib.suppress(StoreError, OSError):
            store.wait_upload(staged.transfer, staged.key)
