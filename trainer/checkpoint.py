"""Atomic, verified, signal-aware checkpoints for a PyTorch training loop (CONTRACT §3, §4).

One checkpoint is one ``step-<9 digits>/`` directory built by
:class:`daemon.layout.CheckpointWriter`: one ``torch.save`` file per top-level key of
the state (``model.pt``, ``optimizer.pt``, ``rng.pt``, ``progress.pt`` ...) and a
manifest with the sha256 of each, written last. Loading walks checkpoints newest first,
verifies every hash, and reads each file with ``torch.load(weights_only=True)``; a
checkpoint that fails either is skipped with a warning and the next older one is used.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, cast

import torch

from daemon.layout import (
    REASONS,
    TMP_PREFIX,
    CheckpointWriter,
    Manifest,
    ManifestError,
    list_step_dirs,
    load_complete,
    parse_tmp_dir,
    read_manifest,
    step_dir_name,
)
from trainer.rng import capture_rng, restore_rng
from trainer.signals import SignalFlags

log = logging.getLogger("trainer.checkpoint")

CHECKPOINT_DIR_ENV = "SPOT_CHECKPOINT_DIR"
RUN_ID_ENV = "SPOT_RUN_ID"
DEFAULT_RUN_ID = "local"
FILE_SUFFIX = ".pt"
# Keys the manager fills itself in every snapshot; tracked objects may not use them.
RNG_KEY = "rng"
PROGRESS_KEY = "progress"

_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")

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


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or does not fit the objects it is restored into."""


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
    """The writer pid in ``.tmp-step-<9 digits>-<pid>-<anything>``, else None."""
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
        on_save: called with the manifest after each checkpoint written.
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
        self.directory = Path(directory)
        self.run_id = run_id or os.environ.get(RUN_ID_ENV) or DEFAULT_RUN_ID
        self.keep = keep
        self.save_every = save_every
        self.on_save = on_save
        self._tracked: dict[str, Stateful] = {}
        self._last_step: int | None = None
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
        """Put back the signal handlers that were there before this manager."""
        self.signals.uninstall()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- state ---------------------------------------------------------------------

    @property
    def latest_step(self) -> int | None:
        """The step of the newest checkpoint this manager restored from or wrote."""
        return self._last_step

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

    def track(self, **objects: Stateful | None) -> None:
        """Register objects whose ``state_dict()`` goes into each checkpoint as ``<name>.pt``."""
        for name, obj in objects.items():
            if obj is None:
                continue
            if name in (RNG_KEY, PROGRESS_KEY) or not _KEY_RE.match(name):
                raise ValueError(f"{name!r} cannot name a tracked object")
            self._tracked[name] = obj

    def snapshot(self, step: int, **progress: Any) -> dict[str, Any]:
        """The state to save at ``step``: tracked objects, RNG and ``progress`` (plain values).

        The result references live tensors (``state_dict()`` does not copy), so it must
        be written before training continues; a background writer would copy it first.
        """
        if "step" in progress:
            raise ValueError("progress may not contain 'step'; it is the step argument")
        state: dict[str, Any] = {name: obj.state_dict() for name, obj in self._tracked.items()}
        state[RNG_KEY] = capture_rng()
        state[PROGRESS_KEY] = {"step": step, **progress}
        return state

    # -- saving --------------------------------------------------------------------

    def step_done(self, step: int, *, final: bool = False, **progress: Any) -> bool:
        """Call at each step boundary (state after ``step`` steps); True means stop the loop.

        Saves with reason ``final`` when ``final``, ``periodic`` every ``save_every``
        steps, ``requested`` after SIGUSR1 and ``interrupt`` after SIGTERM; writes
        nothing when this step's state is already in a checkpoint. ``progress`` holds
        plain values (epoch, index within the epoch, ...) returned by :meth:`restore`.
        Also safe to call at the boundary training resumed from, before the first step.
        """
        reason: str | None = None
        if final:
            reason = "final"
        elif self.save_every and step > 0 and step % self.save_every == 0:
            reason = "periodic"
        if reason is None and self.signals.stop_requested:
            reason = "interrupt"  # SIGTERM wins over SIGUSR1: the save is the last one
        # Consumed even when the step is already saved: that save answers the request.
        if self.signals.take_save_request() and reason is None:
            reason = "requested"
        if reason is not None and step != self._last_step:
            self.save(step, self.snapshot(step, **progress), reason)
        if self.signals.stop_requested and not final:
            log.info("stopping at step %d: SIGTERM received and the state is saved", step)
        return final or self.signals.stop_requested

    def save(self, step: int, state: Mapping[str, Any], reason: str = "periodic") -> Manifest:
        """Write ``state`` as checkpoint ``step``: one ``<key>.pt`` file per top-level key.

        Atomic: a crash at any point leaves either no ``step-*`` directory or a complete
        one. When a complete checkpoint of ``step`` already exists nothing is written
        and its manifest is returned.
        """
        if reason not in REASONS:
            raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")
        for key, value in state.items():
            if not _KEY_RE.match(key):
                raise ValueError(f"state key {key!r} cannot name a checkpoint file")
            _check_plain(value, key)
        final_dir = self.directory / step_dir_name(step)
        existing = self._existing_complete(final_dir, step)
        if existing is not None:
            log.info("checkpoint %s already complete; nothing new written", final_dir.name)
            self._last_step = step
            return existing
        started = time.monotonic()
        # Split in two (validate above, write below) so a later background writer can
        # take a copied snapshot and run only this part off the training thread.
        with CheckpointWriter(self.directory, self.run_id, step, reason) as writer:
            _ACTIVE_TMP_DIRS.add(writer.tmp_dir)
            try:
                for key, value in state.items():
                    with writer.open_file(key + FILE_SUFFIX) as f:
                        # torch.save only calls write() on a file object; the writer
                        # hashes and counts the bytes on their way to disk.
                        torch.save(value, cast("IO[bytes]", f))
                manifest = writer.commit()
            finally:
                _ACTIVE_TMP_DIRS.discard(writer.tmp_dir)
        self._known_good.add(final_dir)
        self._last_step = step
        log.info(
            "checkpoint %s saved (reason %s, %.1f MB in %.2f s)",
            final_dir.name,
            reason,
            manifest.total_bytes / 1e6,
            time.monotonic() - started,
        )
        self.prune()
        if self.on_save is not None:
            self.on_save(manifest)
        return manifest

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
        """Remove ``.tmp-step-*`` directories whose writer process is gone."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        me = os.getpid()
        for entry in entries:
            pid = _tmp_dir_pid(entry.name)
            if pid is None or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
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

    def load_latest(self, map_location: Any = "cpu") -> Checkpoint | None:
        """The newest checkpoint that verifies and loads; None when there is none.

        Each one skipped (bad manifest, wrong size or sha256, a file torch.load refuses)
        is logged as a WARNING naming the file and the reason.
        """
        for _step, path in list_step_dirs(self.directory):
            try:
                manifest = load_complete(path, hash_files=True)
            except (ManifestError, OSError) as exc:
                log.warning("skipping checkpoint %s: %s", path.name, exc)
                continue
            state: dict[str, Any] = {}
            failed = False
            for entry in manifest.files:
                if not entry.path.endswith(FILE_SUFFIX) or "/" in entry.path:
                    continue  # not one of ours; another tool may add files
                file = path / entry.path
                try:
                    # weights_only: a checkpoint can come from a bucket; unpickling
                    # arbitrary objects from it would run arbitrary code.
                    state[entry.path[: -len(FILE_SUFFIX)]] = torch.load(
                        file, map_location=map_location, weights_only=True
                    )
                except Exception as exc:  # any failure to deserialize: use an older one
                    log.warning(
                        "skipping checkpoint %s: %s could not be loaded: %s",
                        path.name,
                        file,
                        _first_line(exc),
                    )
                    failed = True
                    break
            if failed:
                self._unloadable.add(path)
                continue
            self._known_good.add(path)
            log.info("loaded checkpoint %s (reason %s)", path.name, manifest.reason)
            return Checkpoint(path, manifest, state)
        return None

    def restore(
        self,
        model: Stateful | None = None,
        optimizer: Stateful | None = None,
        scheduler: Stateful | None = None,
        *,
        map_location: Any = "cpu",
        rng: bool = True,
        **others: Stateful,
    ) -> Resume:
        """Track the given objects and load the newest good checkpoint into them.

        Objects are saved as ``model.pt``, ``optimizer.pt``, ``scheduler.pt`` and
        ``<keyword>.pt`` for each of ``others``. Also restores the RNG states (unless
        ``rng=False``). Returns the step to continue from and the saved progress.
        """
        self.track(model=model, optimizer=optimizer, scheduler=scheduler, **others)
        ckpt = self.load_latest(map_location)
        if ckpt is None:
            log.info("no checkpoint in %s; starting at step 0", self.directory)
            return Resume()
        missing = [name for name in self._tracked if name not in ckpt.state]
        if missing:
            raise CheckpointError(
                f"{ckpt.path} has no {', '.join(m + FILE_SUFFIX for m in missing)} to restore from"
            )
        for name, obj in self._tracked.items():
            obj.load_state_dict(ckpt.state[name])
        if rng and RNG_KEY in ckpt.state:
            restore_rng(ckpt.state[RNG_KEY])
        progress = dict(ckpt.state.get(PROGRESS_KEY) or {})
        progress.pop("step", None)  # the directory's step is authoritative
        self._last_step = ckpt.step
        return Resume(ckpt.step, progress, ckpt.path, ckpt.reason)
