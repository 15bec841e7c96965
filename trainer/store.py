"""Saving and loading one run's checkpoints in ``local_dir``: the manager's store.

:class:`CheckpointStore` is the half of :class:`trainer.CheckpointManager` that writes
and reads checkpoints; the manager adds the training loop's half (signals, the decision
at each step boundary, stopping). Use the manager: this class is not meant to be used
on its own. It keeps the run's bookkeeping (tracked objects, the newest step, how long
the last save took) and hands each job to the module that does it: writing to
:mod:`trainer.writer` (one background save in flight at most), committing another
library's directory to :mod:`trainer.staging`, loading to :mod:`trainer.loading`,
keeping ``local_dir`` in order to :mod:`trainer.localdir`.

One checkpoint is one ``step-<9 digits>/`` directory (CONTRACT §4): one ``torch.save``
file per top-level key of the state (``model.pt``, ``optimizer.pt``, ``rng.pt``,
``progress.pt`` ...), a large value split into shards of at most ``shard_bytes``
(:mod:`trainer.shards`), and a manifest with the sha256 of each, written last.

Under ``torch.distributed`` (two or more ranks) the ranks are grouped by node
(:mod:`trainer.distributed`), and each node's ``local_dir`` is its own (each node's
supervisor sets ``$SPOT_CHECKPOINT_DIR`` on its own disk). Global rank 0 writes the
replicated state (tracked objects, progress, its RNG); every other rank writes only its
own RNG state, as ``rng-rank<5 digits>.pt``; every rank writes its shards of sharded
state (FSDP2 / DTensor, through DCP: :mod:`trainer.sharded`). Each rank writes into its
own node's temporary directory, and each node's leader commits the node's
``step-<9 digits>/`` with a manifest of exactly the node's files and the keys ``ranks``,
``world_size`` and ``node`` (:mod:`trainer.nodes`). On one node that is one directory
holding every rank's files. A resume point is a checkpoint holding every rank's files:
one node's part of a multi-node save is one only once the supervisor has restored the
run's global checkpoint (every node's files) into the node's ``local_dir``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from daemon.layout import FileEntry, Manifest, step_dir_name
from trainer import loading, staging
from trainer import sharded as _sharded
from trainer.distributed import Ranks, detect, rank_suffix
from trainer.errors import CheckpointError
from trainer.localdir import LocalCheckpoints, sweep_stale_tmp_dirs
from trainer.nodes import OpenFile
from trainer.rng import capture_rng
from trainer.snapshot import no_wait
from trainer.state import (
    CHECKPOINT_DIR_ENV,
    DEFAULT_RUN_ID,
    DEFAULT_SHARD_BYTES,
    LOGGER,
    PROGRESS_KEY,
    RNG_KEY,
    RUN_ID_ENV,
    Checkpoint,
    Resume,
    Stateful,
    check_name,
    check_plain,
    check_reason,
    check_state,
)
from trainer.writer import BackgroundSaves, write_checkpoint, write_files

log = logging.getLogger(LOGGER)


class CheckpointStore:
    """Saves and restores a run's state in ``directory``; the base of the CheckpointManager.

    The arguments are :class:`trainer.CheckpointManager`'s of the same names.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        *,
        keep: int | None = 3,
        on_save: Callable[[Manifest], None] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        save_dir: Callable[[Path], object] | None = None,
    ) -> None:
        if directory is None:
            env = os.environ.get(CHECKPOINT_DIR_ENV)
            if not env:
                raise CheckpointError(
                    f"no checkpoint directory: pass directory= or set ${CHECKPOINT_DIR_ENV}"
                )
            directory = env
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1 (or None to keep all), got {keep}")
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
        self.directory = Path(directory)
        self.run_id = run_id or os.environ.get(RUN_ID_ENV) or DEFAULT_RUN_ID
        self.keep = keep
        self.on_save = on_save
        self.shard_bytes = shard_bytes
        self.save_dir = save_dir
        self._tracked: dict[str, Stateful] = {}
        # Saved through DCP (trainer.sharded), every rank its own shards.
        self._sharded: dict[str, Stateful] = {}
        self._last_step: int | None = None
        self._last_save_seconds: float | None = None
        self._saves = BackgroundSaves()
        self._ranks: Ranks | None = None
        self._ranks_final = False
        self._local = LocalCheckpoints()
        self.directory.mkdir(parents=True, exist_ok=True)
        sweep_stale_tmp_dirs(self.directory)

    def close(self) -> None:
        """Wait for the save in flight, then free the snapshot buffers.

        Raises :class:`CheckpointError` when that save failed.
        """
        try:
            self.wait()
        finally:
            self._saves.stop_warmup()  # buffers about to be freed: touch no more
            self._saves.join_warmup()
            self._saves.release()

    # -- state ---------------------------------------------------------------------

    @property
    def latest_step(self) -> int | None:
        """The step of the newest checkpoint this manager restored, wrote or is writing."""
        return self._last_step

    @property
    def in_flight_step(self) -> int | None:
        """The step of a background save not yet reported (being written, or just done)."""
        return self._saves.in_flight_step

    @property
    def last_save_seconds(self) -> float | None:
        """How long the last save took, snapshot to commit (from the manifest after restore)."""
        return self._last_save_seconds

    @property
    def rank(self) -> int:
        """This process's rank under ``torch.distributed`` (0 when not distributed)."""
        ranks = self._dist()
        return ranks.rank if ranks is not None else 0

    def mark_saved(self, step: int) -> None:
        """Record that the state at ``step`` is in a complete checkpoint already.

        For a framework that restored that checkpoint itself: a SIGTERM at that
        boundary then writes nothing new, as after :meth:`restore`.
        """
        self._last_step = step

    def track(self, **objects: Stateful | None) -> None:
        """Register objects whose ``state_dict()`` goes into each checkpoint as ``<name>.pt``."""
        _register(objects, self._tracked, self._sharded, "sharded")

    def track_sharded(self, **objects: Stateful | None) -> None:
        """Register sharded objects (FSDP2 models, DTensor state), saved through DCP.

        Each ``state_dict()`` (of DTensors: use :class:`trainer.sharded.ModelState` for a
        model with its optimizer) goes into every checkpoint under its name, in one DCP
        checkpoint in ``dcp/``: each rank writes its own shards into its node's
        checkpoint directory, global rank 0 also DCP's ``.metadata``. Every rank must
        track the same names (the save and the load are collective). :meth:`restore`
        loads them with ``dcp.load``, each rank reading the parts its shards need.
        """
        _register(objects, self._sharded, self._tracked, "replicated")

    def snapshot(self, step: int, **progress: Any) -> dict[str, Any]:
        """The state to save at ``step``: tracked objects, RNG and ``progress`` (plain values).

        The result references live tensors (``state_dict()`` does not copy): a
        synchronous :meth:`save` writes it before training continues, and a background
        save copies it into CPU memory first. Under ``torch.distributed`` ranks other
        than 0 contribute only their RNG state, as ``rng-rank<5 digits>``.
        """
        if "step" in progress:
            raise ValueError("progress may not contain 'step'; it is the step argument")
        ranks = self._dist()
        if ranks is not None and not ranks.is_writer:
            return {RNG_KEY + rank_suffix(ranks.rank): capture_rng()}
        state: dict[str, Any] = {name: obj.state_dict() for name, obj in self._tracked.items()}
        state[RNG_KEY] = capture_rng()
        state[PROGRESS_KEY] = {"step": step, **progress}
        return state

    def _dist(self) -> Ranks | None:
        """The job's ranks, found (and its process groups made) on first use."""
        if not self._ranks_final:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                # Decided once: every rank reaches this at the same call.
                self._ranks = detect()
                self._ranks_final = True
        return self._ranks

    # -- saving --------------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any], reason: str = "periodic") -> Manifest:
        """Write ``state`` as checkpoint ``step`` now: one ``<key>.pt`` per top-level key.

        Waits for a save in flight first. Atomic: a crash at any point leaves either no
        ``step-*`` directory or a complete one. When a complete checkpoint of ``step``
        already exists nothing is written and its manifest is returned.
        """
        self.wait()
        check_state(state, reason, self.shard_bytes)
        started = time.monotonic()
        parts = _sharded.state_of(self._sharded) if self._sharded else None
        manifest, written = self._write(step, state, reason, started, no_wait, parts)
        return self._saved(step, manifest, written, started)

    def save_async(self, step: int, state: Mapping[str, Any], reason: str = "periodic") -> None:
        """Copy ``state`` into CPU memory and write it as checkpoint ``step`` in the background.

        Returns once the copy is made (training may then change the live tensors).
        Waits first for a save in flight: at most one is written at a time. The files
        and manifest are those :meth:`save` would write. Its outcome is reported by
        the next :meth:`step_done`, :meth:`wait` or :meth:`close`.
        """
        self.wait()
        check_state(state, reason, self.shard_bytes)
        started = time.monotonic()
        copy, ready = self._saves.copy(state)
        parts = _sharded.cpu_copy(_sharded.state_of(self._sharded)) if self._sharded else None
        previous_step, self._last_step = self._last_step, step

        def write() -> tuple[Manifest, bool]:
            manifest, written = self._write(step, copy, reason, started, ready, parts)
            self._finished(manifest, written, started)
            return manifest, written

        self._saves.start(step, reason, previous_step, write)
        log.debug("step %d: state copied in %.3f s", step, time.monotonic() - started)

    def save_directory(
        self,
        step: int,
        reason: str = "periodic",
        *,
        source: str | os.PathLike[str] | None = None,
        fill: Callable[[Path], object] | None = None,
        progress: Mapping[str, Any] | None = None,
        began: float | None = None,
    ) -> Manifest:
        """Commit a directory another library wrote, as checkpoint ``step``, without copying it.

        Give either ``source``, a finished directory (a ``transformers`` Trainer's
        ``checkpoint-N``), which is moved here by one rename, so it must be on the
        filesystem of the checkpoint directory; or ``fill``, called with an empty
        staging directory (``.tmp-staging-step-*``) to write into (Lightning's
        ``trainer.save_checkpoint``, Accelerate's ``save_state``). Either way each file
        is fsynced before the directory is renamed to ``.tmp-step-*`` (where the
        supervisor may upload it at once), its sha256 read back for the manifest, which
        is written last, and the directory renamed to ``step-<9 digits>`` (CONTRACT §4).
        ``progress`` (plain values) is added as ``progress.pt``. ``began``: when the
        library started writing (``time.monotonic()``), so that the duration kept for
        the deadline check covers its part too.

        When a complete checkpoint of ``step`` exists already nothing is written (a
        ``source`` is deleted) and its manifest is returned. Under ``torch.distributed``
        every rank calls it: ``fill`` runs on every rank (into rank 0's staging
        directory), then rank 0 commits; all ranks share one ``local_dir``.
        """
        if (source is None) == (fill is None):
            raise ValueError("give exactly one of source= and fill=")
        check_reason(reason)
        if progress is not None:
            check_plain(dict(progress), "progress")
        self.wait()
        started = time.monotonic() if began is None else began
        src = Path(source) if source is not None else None
        job = staging.Adoption(
            self.directory, self.run_id, step, reason, src, fill, progress, started
        )
        ranks = self._dist()
        if ranks is None:
            manifest, written = staging.adopt(job, self._local)
        else:
            manifest, written = staging.adopt_distributed(job, self._local, ranks)
        return self._saved(step, manifest, written, started)

    def wait(self) -> Manifest | None:
        """Block until background work is done; the manifest of the save in flight, if any.

        Calls ``on_save`` for it, or raises :class:`CheckpointError` when it failed
        (its temporary directory is gone: a failed save never leaves a ``step-*``).
        """
        job = self._saves.wait()
        if job is None:
            return None
        failure = job.failure()
        if failure is not None:
            if self._last_step == job.step:
                self._last_step = job.previous_step
            raise failure from job.error
        if job.written and job.manifest is not None:
            self._report(job.manifest)
        return job.manifest

    def _saved(self, step: int, manifest: Manifest, written: bool, started: float) -> Manifest:
        """After a save on the training thread: the newest step, bookkeeping, ``on_save``."""
        self._last_step = step
        self._finished(manifest, written, started)
        if written:
            self._report(manifest)
        return manifest

    def _report(self, manifest: Manifest) -> None:
        """``on_save`` for a checkpoint just written (rank 0 only)."""
        if self.on_save is not None and self.rank == 0:
            self.on_save(manifest)

    def _finished(self, manifest: Manifest, written: bool, started: float) -> None:
        """Bookkeeping after a save, on whichever thread wrote it."""
        final_dir = self.directory / step_dir_name(manifest.step)
        if not written:
            log.info("checkpoint %s already complete; nothing new written", final_dir.name)
            return
        self._last_save_seconds = time.monotonic() - started
        self._local.known_good.add(final_dir)
        ranks = self._ranks
        if ranks is not None and not ranks.is_leader:
            return  # each node's leader logs and prunes its own local_dir
        log.info(
            "checkpoint %s saved (reason %s, %.1f MB in %.2f s)",
            final_dir.name,
            manifest.reason,
            manifest.total_bytes / 1e6,
            self._last_save_seconds,
        )
        self.prune()

    def _write(
        self,
        step: int,
        state: Mapping[str, Any],
        reason: str,
        started: float,
        ready: Callable[[], None],
        parts: dict[str, Any] | None = None,
    ) -> tuple[Manifest, bool]:
        """:func:`trainer.writer.write_checkpoint` with this manager's settings (any thread)."""
        return write_checkpoint(
            self.directory,
            self.run_id,
            step,
            reason,
            started,
            ready=ready,
            ranks=self._ranks,
            local=self._local,
            write_files=lambda open_file: self._write_files(open_file, state),
            parts=parts,
        )

    def _write_files(self, open_file: OpenFile, state: Mapping[str, Any]) -> list[FileEntry]:
        """torch.save every value of ``state`` through ``open_file``; the entries written.

        Looked up on the manager at every save (tests replace it to make a save fail).
        """
        return write_files(open_file, state, self.shard_bytes, self.directory)

    def prune(self) -> None:
        """Delete ``step-*`` directories older than the newest ``keep`` complete ones."""
        self._local.prune(self.directory, self.keep)

    # -- loading -------------------------------------------------------------------

    def load_latest(self, map_location: Any = "cpu") -> Checkpoint | None:
        """The newest checkpoint that verifies and loads; None when there is none.

        Each one skipped (bad manifest, wrong size or sha256, a file torch.load refuses)
        is logged as a WARNING naming the file and the reason. Sharded values come back
        reassembled. Under ``torch.distributed`` all ranks agree on one checkpoint (the
        newest every rank could load) and each loads its own ``rng-rank*`` file only. One
        node's part of a multi-node save (its manifest's ``ranks`` are not every rank)
        is never loaded: the run resumes from a checkpoint holding every rank's files.
        Sharded state is not loaded here (``dcp.load`` is collective): :meth:`restore`.
        """
        needed = loading.needed_files(self._tracked, bool(self._sharded))

        def load(path: Path, rank: int) -> Checkpoint | None:
            return loading.load_dir(
                path, map_location, rank, self._local, needed, bool(self._sharded)
            )

        return loading.newest(self.directory, self._dist(), load)

    def restore(
        self,
        model: Stateful | None = None,
        optimizer: Stateful | None = None,
        scheduler: Stateful | None = None,
        *,
        map_location: Any = "cpu",
        rng: bool = True,
        sharded: Mapping[str, Stateful] | None = None,
        **others: Stateful,
    ) -> Resume:
        """Track the given objects and load the newest good checkpoint into them.

        Objects are saved as ``model.pt``, ``optimizer.pt``, ``scheduler.pt`` and
        ``<keyword>.pt`` for each of ``others`` (an AMP ``scaler=torch.amp.GradScaler``,
        a data loader's state, ...). ``sharded`` objects (FSDP2 / DTensor state, e.g.
        ``{"model": trainer.sharded.ModelState(model, optimizer)}``) are tracked with
        :meth:`track_sharded` and loaded with ``dcp.load`` (collectively: every rank
        passes the same names). Also restores the RNG states (unless ``rng=False``;
        each rank its own under ``torch.distributed``). Returns the step to continue
        from and the saved progress.
        """
        if self.save_dir is not None:
            objects = (model, optimizer, scheduler, *others.values())
            if sharded or any(o is not None for o in objects):
                raise ValueError(
                    "with save_dir= the library restores its own state: call restore() "
                    "without objects, then load the returned Resume.path with it"
                )
            return self._restore_directory()
        self.track(model=model, optimizer=optimizer, scheduler=scheduler, **others)
        self.track_sharded(**(sharded or {}))
        ckpt = self.load_latest(map_location)
        if ckpt is None:
            log.info("no checkpoint in %s; starting at step 0", self.directory)
            return Resume()
        loading.restore_into(ckpt, self._tracked, self._sharded, self._dist(), rng=rng)
        progress = dict(ckpt.state.get(PROGRESS_KEY) or {})
        return self._resumed(ckpt.manifest, progress, ckpt.path)

    def _restore_directory(self) -> Resume:
        """:meth:`restore` with ``save_dir=``: the newest verified checkpoint, for the library."""
        found = loading.newest(
            self.directory, self._dist(), lambda path, _rank: loading.verify_dir(path, self._local)
        )
        if found is None:
            log.info("no checkpoint in %s; starting at step 0", self.directory)
            return Resume()
        manifest, progress = found
        path = self.directory / step_dir_name(manifest.step)
        log.info("found checkpoint %s (reason %s)", path.name, manifest.reason)
        return self._resumed(manifest, progress, path)

    def _resumed(self, manifest: Manifest, progress: dict[str, Any], path: Path) -> Resume:
        """Where training continues from a restored checkpoint; its step counts as saved."""
        progress.pop("step", None)  # the directory's step is authoritative
        self._last_step = manifest.step
        took = loading.save_seconds(manifest)
        if took is not None:
            self._last_save_seconds = took
        return Resume(manifest.step, progress, path, manifest.reason)


def _register(
    objects: Mapping[str, Stateful | None],
    into: dict[str, Stateful],
    other: Mapping[str, Stateful],
    other_kind: str,
) -> None:
    """Add ``objects`` (None ones left out) to ``into``; a name tracked in ``other`` is refused."""
    for name, obj in objects.items():
        if obj is None:
            continue
        check_name(name)
        if name in other:
            raise ValueError(f"{name!r} is tracked as {other_kind} state already")
        into[name] = obj
