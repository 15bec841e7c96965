"""Atomic, verified, signal-aware checkpoints for a PyTorch training loop (CONTRACT §3, §4).

One checkpoint is one ``step-<9 digits>/`` directory built by
:class:`daemon.layout.CheckpointWriter`: one ``torch.save`` file per top-level key of
the state (``model.pt``, ``optimizer.pt``, ``rng.pt``, ``progress.pt`` ...), a large
value split into shards of at most ``shard_bytes`` (:mod:`trainer.shards`), and a
manifest with the sha256 of each, written last. Loading walks checkpoints newest first,
verifies every hash, and reads each file with ``torch.load(weights_only=True)``; a
checkpoint that fails either is skipped with a warning and the next older one is used.

Saving is asynchronous by default: at a periodic or requested save the training
thread only copies the state into CPU memory (:mod:`trainer.snapshot`) and a
background thread writes it. At most one save is in flight: a save due while another
is being written waits for it (saves are never skipped, so which steps have a
checkpoint does not depend on disk speed). The save made because the loop stops
(SIGTERM, or the final step) is written at once and waited for, and so is any save in
flight, before :meth:`CheckpointManager.step_done` returns True.

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

For loops the manager does not drive (``transformers.Trainer``, Lightning, Accelerate;
:mod:`trainer.integrations`), :meth:`CheckpointManager.decide` is the step-boundary
decision alone, and :meth:`CheckpointManager.save_directory` commits a directory another
library wrote (in a ``.tmp-staging-step-*`` directory, or its own output directory) by
renaming it into a ``.tmp-step-*`` one, hashing it and writing the manifest last: the
same layout, no byte copied (one node).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, TypeVar, cast

import torch

from daemon.layout import (
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    REASONS,
    TMP_PREFIX,
    CheckpointWriter,
    FileEntry,
    HashingWriter,
    Manifest,
    ManifestError,
    fsync_dir,
    list_step_dirs,
    load_complete,
    open_listed,
    parse_tmp_dir,
    read_manifest,
    step_dir_name,
    write_file,
)
from trainer import sharded as _sharded
from trainer import shards
from trainer.distributed import Ranks, detect, rank_suffix
from trainer.errors import CheckpointError as CheckpointError
from trainer.errors import first_line as _first_line
from trainer.nodes import is_partial, save_per_node
from trainer.rng import capture_rng, restore_rng
from trainer.signals import SignalFlags, notice_deadline
from trainer.snapshot import SnapshotPool

log = logging.getLogger("trainer.checkpoint")
_T = TypeVar("_T")

CHECKPOINT_DIR_ENV = "SPOT_CHECKPOINT_DIR"
RUN_ID_ENV = "SPOT_RUN_ID"
DEFAULT_RUN_ID = "local"
FILE_SUFFIX = shards.FILE_SUFFIX
DEFAULT_SHARD_BYTES = shards.DEFAULT_SHARD_BYTES
# Keys the manager fills itself in every snapshot; tracked objects may not use them.
RNG_KEY = "rng"
PROGRESS_KEY = "progress"
# How much longer than the last save an interrupt save is assumed to take (a loaded
# disk, a larger state), on top of ``deadline_margin``.
SAVE_TIME_FACTOR = 1.25

_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_RANK_FILE_RE = re.compile(r"-rank(\d{5})(?:-\d{5})?\.pt$")
# Where another library writes a checkpoint before it is moved, by one rename, into a
# ``.tmp-step-`` directory (:meth:`CheckpointManager.save_directory`). Not a ``.tmp-step-``
# name: the supervisor uploads files from those as soon as they carry their final name,
# and a library writing in place gives its files their final names while still writing.
STAGING_PREFIX = TMP_PREFIX + "staging-"
_HASH_CHUNK = 4 << 20
_STAGING_RE = re.compile(r"^\.tmp-staging-step-\d{9}-(\d+)-.+$")

# Temporary directories this process is writing right now. The stale-directory sweep
# skips them even though they carry our own pid (a second manager in one process).
_ACTIVE_TMP_DIRS: set[Path] = set()

# Types torch.load(weights_only=True) accepts without an allowlist (checked against
# torch 2.13). A state holding anything else is refused at save time, because finding
# out at load time means the checkpoint is useless exactly when it is needed.
_PLAIN_LEAVES: tuple[type, ...] = (
    int,
    float,
    bool,
    str,
    bytes,
    complex,
    type(None),
    torch.Tensor,
    torch.dtype,
    torch.device,
)


class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()``: modules, optimizers, schedulers."""

    def state_dict(self) -> Any:
        """The object's state as plain containers and tensors."""

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any:
        """Put back what :meth:`state_dict` returned."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint read from disk: its manifest and each file's loaded object."""

    path: Path
    manifest: Manifest
    state: dict[str, Any]

    @property
    def step(self) -> int:
        """The step this checkpoint holds the state after."""
        return self.manifest.step

    @property
    def reason(self) -> str:
        """Why it was written: periodic, interrupt, requested or final."""
        return self.manifest.reason


@dataclass(frozen=True)
class Resume:
    """Where training continues: step 0 and empty progress when there was no checkpoint."""

    step: int = 0
    progress: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    reason: str | None = None

    @property
    def resumed(self) -> bool:
        """True when state was restored from a checkpoint."""
        return self.path is not None


@dataclass(frozen=True)
class Boundary:
    """What one step boundary calls for, as every rank agreed (:meth:`CheckpointManager.decide`)."""

    step: int
    reason: str | None
    """The reason to save with; None when no save is due or this step is already saved."""
    stop: bool
    """SIGTERM arrived (on any rank): stop after this boundary."""
    skip: bool
    """The stop's save is skipped: the notice deadline leaves too little time for it."""

    @property
    def save(self) -> bool:
        """Whether to write a checkpoint of this step now."""
        return self.reason is not None and not self.skip


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError naming the first value weights_only loading would refuse."""
    if isinstance(obj, _PLAIN_LEAVES):
        return
    # Exact types: subclasses (defaultdict, namedtuples) are not on torch's allowlist.
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, set, torch.Size):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) refuses; store it as tensors, numbers, strings, "
        "lists or dicts"
    )


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


def _remove_dir(path: Path, step: int, tag: str) -> None:
    """Rename a directory out of the ``step-*`` namespace, then delete it.

    The rename is atomic, so nobody ever sees a half-deleted ``step-*`` directory;
    a crash during the rmtree leaves a ``.tmp-`` directory the next sweep removes.
    """
    doomed = path.with_name(
        f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}-{tag}{os.urandom(4).hex()}"
    )
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _finished_files(staging: Path) -> list[str]:
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
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    msg = f"{path} is a symlink; a checkpoint holds files only"
                    raise CheckpointError(msg) from None
                raise
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise CheckpointError(f"{path} is not a regular file")
                os.fsync(fd)
            finally:
                os.close(fd)
            names.append(rel)
        fsync_dir(here)
    return sorted(names)


def _commit_staged(
    local_dir: Path, run_id: str, step: int, reason: str, staging: Path, extra: dict[str, Any]
) -> Manifest:
    """Move a finished staging directory into ``.tmp-step-*``, list it in a manifest, commit it.

    CONTRACT §4 by one rename instead of a copy: every file is fsynced while it is still
    out of the supervisor's sight, then the whole directory becomes ``.tmp-step-N-*``,
    so each file appears there under its final name already finished. Its sha256 is
    read back, the manifest written last, and the directory renamed to ``step-N``.
    """
    names = _finished_files(staging)
    writer = CheckpointWriter(local_dir, run_id, step, reason, extra)
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
    _ACTIVE_TMP_DIRS.add(writer.tmp_dir)
    try:
        entries = []
        for rel in names:
            h, size = hashlib.sha256(), 0
            with open_listed(writer.tmp_dir, rel) as f:
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            entries.append(FileEntry(rel, size, h.hexdigest()))
        writer.add_files(entries)
        return writer.commit()
    finally:
        _ACTIVE_TMP_DIRS.discard(writer.tmp_dir)
        writer.__exit__(None, None, None)  # removes the directory unless committed


def newest_verified(directory: str | os.PathLike[str]) -> tuple[Path, Manifest] | None:
    """The newest complete checkpoint in ``directory`` whose every file matches its sha256.

    Reads no file into memory beyond hashing it: for a checkpoint another library will
    load itself. Each one skipped is logged as a WARNING with the reason.
    """
    for _step, path in list_step_dirs(Path(directory)):
        try:
            return path, load_complete(path, hash_files=True)
        except (ManifestError, OSError) as exc:
            log.warning("skipping checkpoint %s: %s", path.name, exc)
    return None


def _nothing() -> None:
    """A snapshot that needs no waiting for (the state is already in CPU memory)."""


@dataclass
class _Job:
    """One save written by the background thread."""

    step: int
    reason: str
    previous_step: int | None
    thread: threading.Thread | None = None
    manifest: Manifest | None = None
    written: bool = False
    error: BaseException | None = None


class CheckpointManager:
    """Saves and restores a training run's state in ``$SPOT_CHECKPOINT_DIR``.

    Typical use::

        ckpt = CheckpointManager(save_every=100)
        resume = ckpt.restore(model, optimizer, scheduler)
        step = resume.step
        while not ckpt.step_done(step, final=step == total_steps):
            train_one_step()
            step += 1

    :meth:`step_done` is the one call per step boundary: it saves every ``save_every``
    steps, on SIGUSR1, on SIGTERM and at the final step, and returns True when the
    loop should end (after the final step, or after SIGTERM once the state is saved).

    Args:
        directory: where checkpoints live; default ``$SPOT_CHECKPOINT_DIR``.
        run_id: written into each manifest; default ``$SPOT_RUN_ID``, else ``"local"``.
        keep: how many complete checkpoints to keep locally (None keeps all).
        save_every: save with reason ``periodic`` at every step divisible by this.
        handle_signals: install the SIGTERM / SIGUSR1 handlers (main thread only).
        on_save: called with the manifest after each checkpoint written, on the
            training thread (for a background save: at the first ``step_done``,
            :meth:`wait` or :meth:`close` after it finished); on rank 0 only.
        async_save: write periodic and requested saves in a background thread; the
            loop then waits only for the copy of the state into CPU memory.
        shard_bytes: a state value whose tensors hold more than this is written as
            several files of at most about this size (``<key>-00000.pt`` ...).
        notice_file: the supervisor's notice (default ``$SPOT_NOTICE_FILE``): when
            stopping, a save that cannot finish before its deadline is skipped.
        deadline_margin: seconds kept free before the notice deadline, on top of
            ``1.25 x`` the duration of the last save.
        save_dir: for a library that saves its own state into a directory (Accelerate's
            ``accelerator.save_state``): each save calls it with an empty staging
            directory, then commits what it wrote (:meth:`save_directory`) with the
            progress of :meth:`step_done` as ``progress.pt``. :meth:`restore` then
            takes no objects and returns the checkpoint's path for the library to load.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        *,
        keep: int | None = 3,
        save_every: int | None = None,
        handle_signals: bool = True,
        on_save: Callable[[Manifest], None] | None = None,
        async_save: bool = True,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        notice_file: str | os.PathLike[str] | None = None,
        deadline_margin: float = 5.0,
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
        if save_every is not None and save_every < 1:
            raise ValueError(f"save_every must be at least 1 (or None), got {save_every}")
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
        if deadline_margin < 0:
            raise ValueError(f"deadline_margin must not be negative, got {deadline_margin}")
        self.directory = Path(directory)
        self.run_id = run_id or os.environ.get(RUN_ID_ENV) or DEFAULT_RUN_ID
        self.keep = keep
        self.save_every = save_every
        self.on_save = on_save
        self.async_save = async_save
        self.shard_bytes = shard_bytes
        self.notice_file = notice_file
        self.deadline_margin = deadline_margin
        self.save_dir = save_dir
        self.skipped_step: int | None = None
        self._tracked: dict[str, Stateful] = {}
        # Saved through DCP (trainer.sharded), every rank its own shards.
        self._sharded: dict[str, Stateful] = {}
        self._last_step: int | None = None
        self._last_save_seconds: float | None = None
        self._job: _Job | None = None
        self._pool = SnapshotPool()
        self._warmup: threading.Thread | None = None
        self._warmed = False
        self._ranks: Ranks | None = None
        self._ranks_final = False
        # Checkpoints whose hashes we checked (or wrote) and whose files loaded, and
        # ones whose files did not: saves and pruning use both instead of re-hashing.
        self._known_good: set[Path] = set()
        self._unloadable: set[Path] = set()
        self.signals = SignalFlags()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_tmp_dirs()
        if handle_signals:
            self.signals.install()

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Wait for the save in flight, then put back the previous signal handlers.

        Raises :class:`CheckpointError` when that save failed.
        """
        try:
            self.wait()
        finally:
            self._join_warmup()
            self.signals.uninstall()
            self._pool.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as save_error:  # the exception already raised wins
            log.error("%s", save_error)

    # -- state ---------------------------------------------------------------------

    @property
    def latest_step(self) -> int | None:
        """The step of the newest checkpoint this manager restored, wrote or is writing."""
        return self._last_step

    @property
    def in_flight_step(self) -> int | None:
        """The step of a background save not yet reported (being written, or just done)."""
        job = self._job
        return job.step if job is not None and job.thread is not None else None

    @property
    def last_save_seconds(self) -> float | None:
        """How long the last save took, snapshot to commit (from the manifest after restore)."""
        return self._last_save_seconds

    @property
    def rank(self) -> int:
        """This process's rank under ``torch.distributed`` (0 when not distributed)."""
        ranks = self._dist()
        return ranks.rank if ranks is not None else 0

    @property
    def stop_requested(self) -> bool:
        """SIGTERM (or :meth:`request_stop`) arrived: save at the next boundary, then stop."""
        return self.signals.stop_requested

    def request_stop(self) -> None:
        """Behave as if SIGTERM arrived (for callers that learn of a notice another way)."""
        self.signals.stop_requested = True

    def request_save(self) -> None:
        """Behave as if SIGUSR1 arrived: save at the next step boundary."""
        self.signals.save_requested = True

    def mark_saved(self, step: int) -> None:
        """Record that the state at ``step`` is in a complete checkpoint already.

        For a framework that restored that checkpoint itself: a SIGTERM at that
        boundary then writes nothing new, as after :meth:`restore`.
        """
        self._last_step = step

    def track(self, **objects: Stateful | None) -> None:
        """Register objects whose ``state_dict()`` goes into each checkpoint as ``<name>.pt``."""
        for name, obj in objects.items():
            if obj is None:
                continue
            if name in (RNG_KEY, PROGRESS_KEY) or not _KEY_RE.match(name):
                raise ValueError(f"{name!r} cannot name a tracked object")
            if name in self._sharded:
                raise ValueError(f"{name!r} is tracked as sharded state already")
            self._tracked[name] = obj

    def track_sharded(self, **objects: Stateful | None) -> None:
        """Register sharded objects (FSDP2 models, DTensor state), saved through DCP.

        Each ``state_dict()`` (of DTensors: use :class:`trainer.sharded.ModelState` for a
        model with its optimizer) goes into every checkpoint under its name, in one DCP
        checkpoint in ``dcp/``: each rank writes its own shards into its node's
        checkpoint directory, global rank 0 also DCP's ``.metadata``. Every rank must
        track the same names (the save and the load are collective). :meth:`restore`
        loads them with ``dcp.load``, each rank reading the parts its shards need.
        """
        for name, obj in objects.items():
            if obj is None:
                continue
            if name in (RNG_KEY, PROGRESS_KEY) or not _KEY_RE.match(name):
                raise ValueError(f"{name!r} cannot name a tracked object")
            if name in self._tracked:
                raise ValueError(f"{name!r} is tracked as replicated state already")
            self._sharded[name] = obj

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

    def step_done(self, step: int, *, final: bool = False, **progress: Any) -> bool:
        """Call at each step boundary (state after ``step`` steps); True means stop the loop.

        Saves with reason ``final`` when ``final``, ``periodic`` every ``save_every``
        steps, ``requested`` after SIGUSR1 and ``interrupt`` after SIGTERM; writes
        nothing when this step's state is already in a checkpoint or in the one being
        written. ``progress`` holds plain values (epoch, index within the epoch, ...)
        returned by :meth:`restore`. Also safe to call at the boundary training resumed
        from, before the first step.

        A periodic or requested save is written in the background (``async_save``);
        the save made when stopping is written at once, unless the notice deadline
        leaves too little time for it (then it is skipped, and said so in the log).
        Before returning True every save is finished. Raises :class:`CheckpointError`
        when a background save failed. Under ``torch.distributed`` every rank must
        call it at every boundary: one all_reduce agrees on stop and save.
        """
        self._collect()
        if self.async_save and self.save_dir is None and not self._warmed:
            self._warm(self.snapshot(step, **progress))
        boundary = self.decide(step, final=final)
        stop, reason = boundary.stop, boundary.reason
        if boundary.save and reason is not None:
            if self.save_dir is not None:
                _check_plain(progress, "progress")
                self.save_directory(step, reason, fill=self.save_dir, progress=progress)
            elif stop or final or not self.async_save:
                self.save(step, self.snapshot(step, **progress), reason)
            else:
                self.save_async(step, self.snapshot(step, **progress), reason)
        if stop or final:
            self.wait()
        if stop and not final:
            saved_now = self.skipped_step != step
            log.info(
                "stopping at step %d: SIGTERM received%s",
                step,
                " and the state is saved" if saved_now else "; its save was skipped",
            )
        return final or stop

    def decide(self, step: int, *, final: bool = False, periodic: bool | None = None) -> Boundary:
        """Whether to save (and why) and whether to stop at boundary ``step``, all ranks agreed.

        The decision part of :meth:`step_done`, for a loop the manager does not drive (a
        framework's trainer, whose callbacks then save and stop): consumes SIGUSR1,
        looks at SIGTERM and the notice deadline, and under ``torch.distributed`` makes
        every rank agree with one all_reduce (every rank must call it at every
        boundary). ``periodic`` says whether a periodic save is due (the framework's own
        schedule); None uses ``save_every``. The reason is None when the step is already
        in a checkpoint. A stop whose save the deadline does not leave time for is
        logged and recorded (:attr:`skipped_step`) here.
        """
        ranks = self._dist()
        stop = self.signals.stop_requested
        save_request = self.signals.take_save_request()
        saved = step == self._last_step  # in a complete checkpoint, or the one being written
        reason = self._reason(step, final, stop, save_request, periodic)
        doomed = bool(stop and reason is not None and not saved and self._doomed(step))
        if ranks is not None:
            agreed = ranks.agree_max([int(stop), int(save_request), int(doomed)])
            if agreed[0] and not stop:
                log.info("stop agreed at step %d: another rank received SIGTERM", step)
                self.signals.stop_requested = True
            stop, save_request, doomed = (bool(v) for v in agreed)
            reason = self._reason(step, final, stop, save_request, periodic)
        if saved:
            reason = None
        skip = bool(stop and doomed and reason is not None)
        if skip and reason is not None:
            self._skip(step, reason)
        return Boundary(step, reason, stop, skip)

    def _reason(
        self,
        step: int,
        final: bool,
        stop: bool,
        save_request: bool,
        periodic: bool | None = None,
    ) -> str | None:
        if final:
            return "final"
        if stop:
            # CONTRACT §3: a save made because of SIGTERM is an interrupt save, even at a
            # periodic boundary; and SIGTERM wins over SIGUSR1, as the save is the last one.
            return "interrupt"
        if periodic is None:
            periodic = bool(self.save_every and step > 0 and step % self.save_every == 0)
        if periodic:
            return "periodic"
        # A request at a step already saved is answered by that save.
        return "requested" if save_request else None

    def _doomed(self, step: int) -> bool:
        """Whether the notice deadline leaves less time than a save needs."""
        deadline = notice_deadline(self.notice_file)
        if deadline is None:
            return False
        left = (deadline - dt.datetime.now(dt.timezone.utc)).total_seconds()
        took = self._last_save_seconds or 0.0
        needed = took * SAVE_TIME_FACTOR + self.deadline_margin
        if left >= needed:
            return False
        log.warning(
            "save_skipped: not saving step %d: the notice deadline is %.1f s away and the "
            "last save took %.1f s (%.1f s needed with the margin); a save cut off by the "
            "kill would leave only a partial directory. Newest checkpoint: step %s",
            step,
            left,
            took,
            needed,
            self._last_step,
        )
        return True

    def _skip(self, step: int, reason: str) -> None:
        self.skipped_step = step
        log.warning(
            "save_skipped: the %s save at step %d is skipped (deadline); exiting with the "
            "newest checkpoint at step %s",
            reason,
            step,
            self._last_step,
        )

    def _validate(self, state: Mapping[str, Any], reason: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")
        names: set[str] = set()
        for key, value in state.items():
            if not _KEY_RE.match(key):
                raise ValueError(f"state key {key!r} cannot name a checkpoint file")
            _check_plain(value, key)
            for name in shards.file_names(key, value, self.shard_bytes):
                if name in names:
                    raise ValueError(f"two state keys would both write {name}")
                names.add(name)

    def save(self, step: int, state: Mapping[str, Any], reason: str = "periodic") -> Manifest:
        """Write ``state`` as checkpoint ``step`` now: one ``<key>.pt`` per top-level key.

        Waits for a save in flight first. Atomic: a crash at any point leaves either no
        ``step-*`` directory or a complete one. When a complete checkpoint of ``step``
        already exists nothing is written and its manifest is returned.
        """
        self.wait()
        self._validate(state, reason)
        started = time.monotonic()
        parts = _sharded.state_of(self._sharded) if self._sharded else None
        manifest, written = self._write(step, state, reason, started, _nothing, parts)
        self._last_step = step
        self._finished(manifest, written, started)
        if written and self.on_save is not None and self.rank == 0:
            self.on_save(manifest)
        return manifest

    def save_async(self, step: int, state: Mapping[str, Any], reason: str = "periodic") -> None:
        """Copy ``state`` into CPU memory and write it as checkpoint ``step`` in the background.

        Returns once the copy is made (training may then change the live tensors).
        Waits first for a save in flight: at most one is written at a time. The files
        and manifest are those :meth:`save` would write. Its outcome is reported by
        the next :meth:`step_done`, :meth:`wait` or :meth:`close`.
        """
        self.wait()
        self._validate(state, reason)
        started = time.monotonic()
        self._join_warmup()
        copy, ready = self._pool.copy(state)
        parts = _sharded.cpu_copy(_sharded.state_of(self._sharded)) if self._sharded else None
        job = _Job(step, reason, self._last_step)
        self._last_step = step

        def run() -> None:
            try:
                job.manifest, job.written = self._write(step, copy, reason, started, ready, parts)
                self._finished(job.manifest, job.written, started)
            except BaseException as exc:  # reported on the training thread by wait()
                job.error = exc

        # Not a daemon thread: an interpreter that exits while it writes waits for it,
        # so a checkpoint is finished rather than cut off.
        job.thread = threading.Thread(target=run, name=f"checkpoint-{step_dir_name(step)}")
        self._job = job
        job.thread.start()
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
        if reason not in REASONS:
            raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")
        if progress is not None:
            _check_plain(dict(progress), "progress")
        self.wait()
        started = time.monotonic() if began is None else began
        src = Path(source) if source is not None else None
        ranks = self._dist()
        if ranks is None:
            manifest, written = self._adopt(step, reason, src, fill, progress, started)
        else:
            manifest, written = self._adopt_distributed(
                ranks, step, reason, src, fill, progress, started
            )
        self._last_step = step
        self._finished(manifest, written, started)
        if written and self.on_save is not None and self.rank == 0:
            self.on_save(manifest)
        return manifest

    def _new_staging(self, step: int) -> Path:
        path = self.directory / (
            f"{STAGING_PREFIX}{step_dir_name(step)}-{os.getpid()}-{os.urandom(4).hex()}"
        )
        path.mkdir()
        _ACTIVE_TMP_DIRS.add(path)
        return path

    def _write_progress(self, staging: Path, step: int, progress: Mapping[str, Any]) -> None:
        with write_file(staging, PROGRESS_KEY + FILE_SUFFIX) as f:
            torch.save({"step": step, **progress}, cast("IO[bytes]", f))

    def _adopt(
        self,
        step: int,
        reason: str,
        source: Path | None,
        fill: Callable[[Path], object] | None,
        progress: Mapping[str, Any] | None,
        started: float,
    ) -> tuple[Manifest, bool]:
        final_dir = self.directory / step_dir_name(step)
        existing = self._existing_complete(final_dir, step)
        if existing is not None:
            if source is not None:
                shutil.rmtree(source, ignore_errors=True)
            return existing, False
        staging = source if source is not None else self._new_staging(step)
        try:
            if fill is not None:
                fill(staging)
            if progress is not None:
                self._write_progress(staging, step, progress)
            extra = {"save_seconds": round(time.monotonic() - started, 3)}
            manifest = _commit_staged(self.directory, self.run_id, step, reason, staging, extra)
        finally:
            _ACTIVE_TMP_DIRS.discard(staging)
            if fill is not None:
                shutil.rmtree(staging, ignore_errors=True)  # gone already when committed
        return manifest, True

    def _adopt_distributed(
        self,
        ranks: Ranks,
        step: int,
        reason: str,
        source: Path | None,
        fill: Callable[[Path], object] | None,
        progress: Mapping[str, Any] | None,
        started: float,
    ) -> tuple[Manifest, bool]:
        """:meth:`_adopt` on every rank: rank 0 stages and commits, ``fill`` runs everywhere."""
        if ranks.node_count > 1:
            # Every rank's files would have to reach rank 0's local_dir; a library's own
            # directory is not split by node as this manager's own saves are.
            raise CheckpointError(
                "save_directory serves one node: this job spans "
                f"{ranks.node_count} nodes (use the manager's own saves there)"
            )
        final_dir = self.directory / step_dir_name(step)
        opening: tuple[str, Any] | None = None
        staging: Path | None = None
        if ranks.is_writer:
            try:
                existing = self._existing_complete(final_dir, step)
                if existing is not None:
                    opening = ("exists", existing)
                else:
                    staging = source if source is not None else self._new_staging(step)
                    opening = ("stage", str(staging))
            except Exception as exc:
                opening = ("error", f"rank 0: {_first_line(exc)}")
        try:
            kind, value = ranks.broadcast(opening)
            if kind == "exists":
                if source is not None and ranks.is_writer:
                    shutil.rmtree(source, ignore_errors=True)
                return cast(Manifest, value), False
            if kind == "error":
                raise CheckpointError(f"saving {final_dir.name} failed: {value}")
            problem: str | None = None
            if fill is not None:
                try:
                    fill(Path(str(value)))
                except Exception as exc:
                    problem = f"rank {ranks.rank}: {_first_line(exc)}"
            problems = [p for p in ranks.gather(problem) if p]
            outcome: tuple[str, Any] | None = None
            if staging is not None:
                try:
                    if problems:
                        raise CheckpointError("; ".join(problems))
                    if progress is not None:
                        self._write_progress(staging, step, progress)
                    extra = {
                        "save_seconds": round(time.monotonic() - started, 3),
                        "world_size": ranks.world_size,
                    }
                    manifest = _commit_staged(
                        self.directory, self.run_id, step, reason, staging, extra
                    )
                    outcome = ("ok", manifest)
                except Exception as exc:
                    outcome = ("error", _first_line(exc))
            kind, value = ranks.broadcast(outcome)
            if kind == "error":
                raise CheckpointError(f"saving {final_dir.name} failed: {value}")
            return cast(Manifest, value), True
        finally:
            if staging is not None:
                _ACTIVE_TMP_DIRS.discard(staging)
                if fill is not None:
                    shutil.rmtree(staging, ignore_errors=True)

    def _warm(self, state: Mapping[str, Any]) -> None:
        """Allocate the snapshot buffers in the background, before the first save needs them.

        Fresh memory costs a page fault per 4 KiB on first touch (pinning on CUDA costs
        more): done here, off the loop, the first save stalls no longer than later ones.
        """
        self._warmed = True
        sizes = SnapshotPool.sizes(state)
        self._warmup = threading.Thread(
            target=self._pool.allocate,
            args=(sizes,),
            name="checkpoint-warmup",
            daemon=True,
        )
        self._warmup.start()

    def _join_warmup(self) -> None:
        if self._warmup is not None:
            self._warmup.join()
            self._warmup = None

    def wait(self) -> Manifest | None:
        """Block until background work is done; the manifest of the save in flight, if any.

        Calls ``on_save`` for it, or raises :class:`CheckpointError` when it failed
        (its temporary directory is gone: a failed save never leaves a ``step-*``).
        """
        self._join_warmup()
        job = self._job
        if job is None or job.thread is None:
            return None
        job.thread.join()
        self._job = None
        if job.error is not None:
            if self._last_step == job.step:
                self._last_step = job.previous_step
            raise CheckpointError(
                f"the background save of checkpoint {step_dir_name(job.step)} "
                f"(reason {job.reason}) failed: {_first_line(job.error)}; "
                f"nothing was written for step {job.step}"
            ) from job.error
        if job.written and job.manifest is not None and self.on_save and self.rank == 0:
            self.on_save(job.manifest)
        return job.manifest

    def _collect(self) -> None:
        """Report a background save that has finished (without waiting for one that has not)."""
        job = self._job
        if job is not None and job.thread is not None and not job.thread.is_alive():
            self.wait()

    def _finished(self, manifest: Manifest, written: bool, started: float) -> None:
        """Bookkeeping after a save, on whichever thread wrote it."""
        final_dir = self.directory / step_dir_name(manifest.step)
        if not written:
            log.info("checkpoint %s already complete; nothing new written", final_dir.name)
            return
        self._last_save_seconds = time.monotonic() - started
        self._known_good.add(final_dir)
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
        """Write one checkpoint (any thread); its manifest, and False when it already existed.

        ``parts``: the sharded objects' state, written through DCP (collectively).
        """
        ready()
        ranks = self._ranks
        write_sharded: Callable[[Path], list[FileEntry]] | None = None
        if parts is not None:
            group = ranks.io if ranks is not None else None

            def write_sharded(tmp_dir: Path) -> list[FileEntry]:
                return _sharded.save(parts, tmp_dir, self.directory, step, group)

        if ranks is not None:
            return save_per_node(
                ranks,
                self.directory,
                self.run_id,
                step,
                reason,
                started,
                existing=self._existing_complete,
                set_aside=self._set_aside,
                write_files=lambda open_file: self._write_files(open_file, state),
                write_sharded=write_sharded,
                active=_ACTIVE_TMP_DIRS,
            )
        final_dir = self.directory / step_dir_name(step)
        existing = self._existing_complete(final_dir, step)
        if existing is not None:
            return existing, False
        with CheckpointWriter(self.directory, self.run_id, step, reason) as writer:
            _ACTIVE_TMP_DIRS.add(writer.tmp_dir)
            try:
                self._write_files(writer.open_file, state)
                if write_sharded is not None:
                    writer.add_files(write_sharded(writer.tmp_dir))
                writer.extra["save_seconds"] = round(time.monotonic() - started, 3)
                return writer.commit(), True
            finally:
                _ACTIVE_TMP_DIRS.discard(writer.tmp_dir)

    def _write_files(
        self,
        open_file: Callable[[str], AbstractContextManager[HashingWriter]],
        state: Mapping[str, Any],
    ) -> list[FileEntry]:
        """torch.save every value of ``state`` through ``open_file``; the entries written."""
        entries = []
        for key, value in state.items():
            for name, make in shards.files_for(key, value, self.shard_bytes):
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
                                f"{f.error.strerror} while writing {name} in {self.directory}",
                            ) from exc
                        raise
                entries.append(FileEntry(name, f.size, f.sha256))
        return entries

    def _existing_complete(self, final_dir: Path, step: int) -> Manifest | None:
        """The manifest of a usable checkpoint already at ``final_dir``; clears a broken one."""
        if not final_dir.exists():
            return None
        if final_dir in self._known_good:
            return read_manifest(final_dir)
        problem: str
        if final_dir in self._unloadable:
            problem = "its files do not load"
        else:
            try:
                return load_complete(final_dir)
            except (ManifestError, OSError) as exc:
                problem = str(exc)
        # Not complete, so not a checkpoint by the contract: replacing it writes nothing
        # inside a complete checkpoint, and leaving it would block this step forever.
        log.warning("replacing broken checkpoint %s (%s)", final_dir, problem)
        _remove_dir(final_dir, step, "broken")
        self._unloadable.discard(final_dir)
        return None

    def _set_aside(self, final_dir: Path, step: int) -> None:
        """Remove a complete checkpoint that this save replaces (renamed out first)."""
        _remove_dir(final_dir, step, "aside")
        self._known_good.discard(final_dir)
        self._unloadable.discard(final_dir)

    def prune(self) -> None:
        """Delete ``step-*`` directories older than the newest ``keep`` complete ones."""
        if self.keep is None:
            return
        complete = 0
        for step, path in list_step_dirs(self.directory):
            if complete >= self.keep:
                log.info("pruning old checkpoint %s", path.name)
                try:
                    _remove_dir(path, step, "pruned")
                except OSError as exc:
                    log.warning("could not prune %s: %s", path, exc)
                self._known_good.discard(path)
                self._unloadable.discard(path)
            elif path in self._known_good:
                complete += 1
            elif path not in self._unloadable:
                # Sizes only: hashing every old checkpoint at every save costs a full
                # read of each; loading still verifies every hash before trusting one.
                try:
                    load_complete(path, hash_files=False)
                except (ManifestError, OSError):
                    continue
                complete += 1

    def _sweep_stale_tmp_dirs(self) -> None:
        """Remove ``.tmp-step-*`` (and DCP scratch) directories whose writer process is gone."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        me = os.getpid()
        for entry in entries:
            scratch = _sharded.scratch_pid(entry.name)
            pid = _tmp_dir_pid(entry.name) if scratch is None else scratch
            if pid is None or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            if scratch is not None and pid == me:
                continue  # DCP scratch is not registered as active: never sweep our own
            if pid == me:
                # Our pid but not being written by us: a previous process that had the
                # same pid (common in containers) died mid-save.
                if path in _ACTIVE_TMP_DIRS:
                    continue
            elif _pid_alive(pid):
                continue  # a live writer (another trainer, or the supervisor restoring)
            log.info("removing %s left by dead writer pid %d", entry.name, pid)
            shutil.rmtree(path, ignore_errors=True)

    # -- loading -------------------------------------------------------------------

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
        return self._newest(lambda path, rank: self._load_dir(path, map_location, rank))

    def _newest(self, load: Callable[[Path, int], _T | None]) -> _T | None:
        """The first checkpoint, newest first, that ``load(path, rank)`` accepts on every rank."""
        candidates = list_step_dirs(self.directory)
        ranks = self._dist()
        if ranks is None:
            for _step, path in candidates:
                found = load(path, 0)
                if found is not None:
                    return found
            return None
        while True:
            # The newest step every rank has; then whether every rank could load it.
            step = ranks.agree_min(candidates[0][0] if candidates else -1)
            if step < 0:
                return None
            at = dict(candidates).get(step)
            found = load(at, ranks.rank) if at else None
            if ranks.agree_min(int(found is not None)) == 1:
                return found
            if found is not None:
                log.warning("skipping checkpoint %s: another rank could not load it", at)
            candidates = [(s, p) for s, p in candidates if s < step]

    def _needed(self) -> list[str]:
        """The files a restore of the tracked objects reads (sharded: DCP's metadata)."""
        names = [name + FILE_SUFFIX for name in self._tracked] + [PROGRESS_KEY + FILE_SUFFIX]
        if self._sharded:
            names.append(f"{_sharded.DCP_DIR}/{_sharded.METADATA_NAME}")
        return names

    def _load_dir(self, path: Path, map_location: Any, rank: int) -> Checkpoint | None:
        """One checkpoint verified and loaded, or None (and a warning) when it fails."""
        try:
            manifest = load_complete(path, hash_files=True)
        except (ManifestError, OSError) as exc:
            log.warning("skipping checkpoint %s: %s", path.name, exc)
            return None
        if is_partial(manifest):
            # One node's part of a multi-node save (its supervisor restores the whole
            # global checkpoint before a start): it lacks the other nodes' files, so it
            # is no resume point, though still a complete checkpoint for keep and sync.
            listed = {f.path for f in manifest.files}
            lacks = [n for n in self._needed() if n not in listed]
            log.warning(
                "skipping checkpoint %s: only the part of node %r (ranks %s of %s)%s",
                path.name,
                manifest.extra.get("node"),
                manifest.extra.get("ranks"),
                manifest.extra.get("world_size"),
                f" and lacks {', '.join(lacks)}" if lacks else "",
            )
            return None
        if self._sharded and any(f.path.startswith(_sharded.DCP_DIR + "/") for f in manifest.files):
            problem = _sharded.problem(path, manifest)
            if problem is not None:
                log.warning("skipping checkpoint %s: %s", path.name, problem)
                self._unloadable.add(path)
                return None
        names = []
        for entry in manifest.files:
            if not entry.path.endswith(FILE_SUFFIX) or "/" in entry.path:
                continue  # not one of ours; another tool may add files
            m = _RANK_FILE_RE.search(entry.path)
            if m is not None and int(m.group(1)) != rank:
                continue  # another rank's own state
            names.append(entry.path)
        present = set(names)
        # A file named like a shard of a key that has a file too: decided by that file.
        maybe_shard = {
            n for n in names if (k := shards.shard_key(n)) and k + FILE_SUFFIX in present
        }
        current = ""

        def load(name: str) -> Any:
            nonlocal current
            if name not in present:
                raise ManifestError(f"{path / name} is referenced but not in the manifest")
            current = name
            # weights_only: a checkpoint can come from a bucket; unpickling arbitrary
            # objects from it would run arbitrary code.
            return torch.load(path / name, map_location=map_location, weights_only=True)

        state: dict[str, Any] = {}
        try:
            claimed: set[str] = set()
            for name in names:
                if name in maybe_shard:
                    continue
                obj = load(name)
                if shards.is_index(obj):
                    claimed.update(shards.index_files(obj))
                    obj = shards.assemble(obj, load)
                state[name[: -len(FILE_SUFFIX)]] = obj
            for name in sorted(maybe_shard - claimed):
                state[name[: -len(FILE_SUFFIX)]] = load(name)
        except Exception as exc:  # any failure to deserialize: use an older one
            log.warning(
                "skipping checkpoint %s: %s could not be loaded: %s",
                path.name,
                path / current,
                _first_line(exc),
            )
            self._unloadable.add(path)
            return None
        self._known_good.add(path)
        log.info("loaded checkpoint %s (reason %s)", path.name, manifest.reason)
        return Checkpoint(path, manifest, state)

    def _verify_dir(self, path: Path, rank: int) -> tuple[Manifest, dict[str, Any]] | None:
        """A checkpoint another library will load: every hash checked, ``progress.pt`` read."""
        try:
            manifest = load_complete(path, hash_files=True)
            progress: dict[str, Any] = {}
            if any(f.path == PROGRESS_KEY + FILE_SUFFIX for f in manifest.files):
                loaded = torch.load(path / (PROGRESS_KEY + FILE_SUFFIX), weights_only=True)
                progress = dict(loaded) if isinstance(loaded, dict) else {}
        except Exception as exc:  # a bad hash, or a progress file that does not load
            log.warning("skipping checkpoint %s: %s", path.name, _first_line(exc))
            return None
        self._known_good.add(path)
        return manifest, progress

    def _restore_directory(self) -> Resume:
        found = self._newest(self._verify_dir)
        if found is None:
            log.info("no checkpoint in %s; starting at step 0", self.directory)
            return Resume()
        manifest, progress = found
        progress.pop("step", None)  # the directory's step is authoritative
        self._last_step = manifest.step
        took = manifest.extra.get("save_seconds")
        if isinstance(took, (int, float)) and not isinstance(took, bool):
            self._last_save_seconds = float(took)
        path = self.directory / step_dir_name(manifest.step)
        log.info("found checkpoint %s (reason %s)", path.name, manifest.reason)
        return Resume(manifest.step, progress, path, manifest.reason)

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
        missing = [name + FILE_SUFFIX for name in self._tracked if name not in ckpt.state]
        dcp_metadata = f"{_sharded.DCP_DIR}/{_sharded.METADATA_NAME}"
        if self._sharded and all(f.path != dcp_metadata for f in ckpt.manifest.files):
            missing.append(dcp_metadata)
        if missing:
            raise CheckpointError(f"{ckpt.path} has no {', '.join(missing)} to restore from")
        for name, obj in self._tracked.items():
            obj.load_state_dict(ckpt.state[name])
        if self._sharded:
            ranks = self._dist()
            try:
                _sharded.load(self._sharded, ckpt.path, ranks.io if ranks is not None else None)
            except Exception as exc:  # DCP raises on every rank alike
                raise CheckpointError(
                    f"{ckpt.path}: the sharded state does not load: {_first_line(exc)}"
                ) from exc
        if rng:
            rank = self.rank
            rng_key = RNG_KEY + rank_suffix(rank) if rank else RNG_KEY
            if rng_key in ckpt.state:
                restore_rng(ckpt.state[rng_key])
            else:
                log.warning(
                    "%s has no %s%s; RNG state not restored",
                    ckpt.path,
                    rng_key,
                    FILE_SUFFIX,
                )
        progress = dict(ckpt.state.get(PROGRESS_KEY) or {})
        progress.pop("step", None)  # the directory's step is authoritative
        self._last_step = ckpt.step
        took = ckpt.manifest.extra.get("save_seconds")
        if isinstance(took, (int, float)) and not isinstance(took, bool):
            self._last_save_seconds = float(took)
        return Resume(ckpt.step, progress, ckpt.path, ckpt.reason)
