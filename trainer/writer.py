"""Writing a checkpoint: the files of one save, and the one save in flight in the background.

:func:`write_checkpoint` writes one checkpoint on whichever thread calls it: in one
process a :class:`daemon.layout.CheckpointWriter` builds ``.tmp-step-*`` and commits it
(CONTRACT §4); under ``torch.distributed`` every rank runs the per-node protocol of
:mod:`trainer.nodes`. Sharded state goes through DCP (:mod:`trainer.sharded`).
:func:`write_files` is the ``torch.save`` of each value, split into shards of at most
``shard_bytes`` (:mod:`trainer.shards`).

:class:`BackgroundSaves` holds the one save at a time that a background thread writes
(a save due while another is being written waits for it: saves are never skipped), the
:class:`trainer.snapshot.SnapshotPool` its copy of the state lives in, and the thread
that allocates those buffers ahead of the first save.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch

from daemon.layout import CheckpointWriter, FileEntry, Manifest, step_dir_name
from trainer import sharded as _sharded
from trainer import shards
from trainer.distributed import Ranks
from trainer.errors import CheckpointError, first_line
from trainer.localdir import ACTIVE_TMP_DIRS, LocalCheckpoints
from trainer.nodes import OpenFile, save_per_node
from trainer.snapshot import SnapshotPool
from trainer.state import LOGGER

log = logging.getLogger(LOGGER)


def write_checkpoint(
    directory: Path,
    run_id: str,
    step: int,
    reason: str,
    started: float,
    *,
    ready: Callable[[], None],
    ranks: Ranks | None,
    local: LocalCheckpoints,
    write_files: Callable[[OpenFile], list[FileEntry]],
    parts: dict[str, Any] | None,
) -> tuple[Manifest, bool]:
    """Write one checkpoint (any thread); its manifest, and False when it already existed.

    ``ready`` returns once the state is in CPU memory (a snapshot's copy has landed);
    ``write_files`` writes the plain state through the opener it is given; ``parts``:
    the sharded objects' state, written through DCP (collectively).
    """
    ready()
    write_sharded: Callable[[Path], list[FileEntry]] | None = None
    if parts is not None:
        group = ranks.io if ranks is not None else None

        def write_sharded(tmp_dir: Path) -> list[FileEntry]:
            return _sharded.save(parts, tmp_dir, directory, step, group)

    if ranks is not None:
        return save_per_node(
            ranks,
            directory,
            run_id,
            step,
            reason,
            started,
            existing=local.existing_complete,
            set_aside=local.set_aside,
            write_files=write_files,
            write_sharded=write_sharded,
            active=ACTIVE_TMP_DIRS,
        )
    final_dir = directory / step_dir_name(step)
    existing = local.existing_complete(final_dir, step)
    if existing is not None:
        return existing, False
    with CheckpointWriter(directory, run_id, step, reason) as writer:
        ACTIVE_TMP_DIRS.add(writer.tmp_dir)
        try:
            write_files(writer.open_file)
            if write_sharded is not None:
                writer.add_files(write_sharded(writer.tmp_dir))
            writer.extra["save_seconds"] = round(time.monotonic() - started, 3)
            return writer.commit(), True
        finally:
            ACTIVE_TMP_DIRS.discard(writer.tmp_dir)


def write_files(
    open_file: OpenFile,
    state: Mapping[str, Any],
    shard_bytes: int,
    directory: Path,
) -> list[FileEntry]:
    """torch.save every value of ``state`` through ``open_file``; the entries written.

    ``directory`` only names the checkpoint directory in the error for a failed write.
    """
    entries = []
    for key, value in state.items():
        for name, make in shards.files_for(key, value, shard_bytes):
            with open_file(name) as f:
                # torch.save only calls write() on a file object; the writer hashes
                # and counts the bytes on their way to disk.
                try:
                    torch.save(make(), cast("IO[bytes]", f))
                except RuntimeError as exc:
                    if f.error is not None:
                        # torch reports a failed write (a full disk) as an internal
                        # "unexpected pos" error: say what really happened.
                        raise OSError(
                            f.error.errno,
                            f"{f.error.strerror} while writing {name} in {directory}",
                        ) from exc
                    raise
            entries.append(FileEntry(name, f.size, f.sha256))
    return entries


@dataclass
class SaveJob:
    """One save written by the background thread."""

    step: int
    reason: str
    previous_step: int | None
    """The newest saved step before this save: the newest again if this one fails."""
    thread: threading.Thread | None = None
    manifest: Manifest | None = None
    written: bool = False
    error: BaseException | None = None

    def failure(self) -> CheckpointError | None:
        """What to raise on the training thread when the save failed; None when it did not."""
        if self.error is None:
            return None
        return CheckpointError(
            f"the background save of checkpoint {step_dir_name(self.step)} "
            f"(reason {self.reason}) failed: {first_line(self.error)}; "
            f"nothing was written for step {self.step}"
        )


class BackgroundSaves:
    """The save a background thread writes (one at a time), and the memory it copies into."""

    def __init__(self) -> None:
        self._job: SaveJob | None = None
        self._pool = SnapshotPool()
        self._warmup: threading.Thread | None = None
        self._stop_warmup = threading.Event()
        self.warmed = False

    @property
    def in_flight_step(self) -> int | None:
        """The step of a save not yet collected by :meth:`wait` (being written, or done)."""
        job = self._job
        return job.step if job is not None and job.thread is not None else None

    @property
    def done(self) -> bool:
        """A save was started and has finished, but :meth:`wait` has not collected it."""
        job = self._job
        return job is not None and job.thread is not None and not job.thread.is_alive()

    def warm(self, state: Mapping[str, Any]) -> None:
        """Allocate the snapshot buffers in the background, before the first save needs them.

        Fresh memory costs a page fault per 4 KiB on first touch (pinning on CUDA costs
        more): done here, off the loop, the first save stalls no longer than later ones.
        """
        self.warmed = True
        sizes = SnapshotPool.sizes(state)

        def allocate() -> None:
            started = time.monotonic()
            if not self._pool.allocate(sizes, self._stop_warmup):
                log.info("snapshot buffers' warm-up stopped: no background save will follow")
            else:
                took = time.monotonic() - started
                log.info("snapshot buffers ready: %.1f MB in %.2f s", self._pool.nbytes / 1e6, took)

        self._warmup = threading.Thread(target=allocate, name="checkpoint-warmup", daemon=True)
        self._warmup.start()

    def stop_warmup(self) -> None:
        """No background save will follow (the loop stops): leave the buffers as they are.

        A stop right after start-up must not wait for, nor share the CPU with, buffers
        only a later background save would use: 2 GiB of state took 5 s to touch on the
        benchmark's machine, pinned memory on a GPU host takes longer. Returns at once.
        """
        self._stop_warmup.set()

    def join_warmup(self) -> None:
        """Wait for the buffers being allocated, if they are."""
        if self._warmup is not None:
            self._warmup.join()
            self._warmup = None

    def copy(self, state: Mapping[str, Any]) -> tuple[Any, Callable[[], None]]:
        """A copy of ``state`` in CPU memory, and what to call before reading it."""
        self.join_warmup()
        return self._pool.copy(state)

    def start(
        self,
        step: int,
        reason: str,
        previous_step: int | None,
        write: Callable[[], tuple[Manifest, bool]],
    ) -> None:
        """Run ``write`` (the save of ``step``) on a thread of its own.

        The caller has waited for the save in flight: at most one is written at a time.
        """
        job = SaveJob(step, reason, previous_step)

        def run() -> None:
            try:
                job.manifest, job.written = write()
            except BaseException as exc:  # reported on the training thread by wait()
                job.error = exc

        # Not a daemon thread: an interpreter that exits while it writes waits for it,
        # so a checkpoint is finished rather than cut off.
        job.thread = threading.Thread(target=run, name=f"checkpoint-{step_dir_name(step)}")
        self._job = job
        job.thread.start()

    def wait(self) -> SaveJob | None:
        """Block until the save in flight is written; that save, if there was one.

        Not the buffers' warm-up: only :meth:`copy` needs them, and it waits for them.
        """
        job = self._job
        if job is None or job.thread is None:
            return None
        job.thread.join()
        self._job = None
        return job

    def release(self) -> None:
        """Drop the snapshot buffers (after the last save)."""
        self._pool.release()
