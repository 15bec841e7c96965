"""Finding the newest checkpoint that verifies and loads, and putting it back into objects.

Checkpoints are tried newest first. Each is verified (manifest, every size and sha256)
and every file read with ``torch.load(weights_only=True)``: a checkpoint can come from a
bucket, and unpickling arbitrary objects from it would run arbitrary code. One that
fails is skipped with a WARNING naming the file and the reason, and the next older one
is tried. Under ``torch.distributed`` every rank takes the same one: the newest every
rank could load (:func:`newest`). One node's part of a multi-node save is never a
resume point (:func:`trainer.nodes.is_partial`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from daemon.layout import Manifest, ManifestError, list_step_dirs, load_complete
from trainer import sharded as _sharded
from trainer import shards
from trainer.distributed import Ranks, rank_suffix
from trainer.errors import CheckpointError, first_line
from trainer.localdir import LocalCheckpoints
from trainer.nodes import is_partial
from trainer.rng import restore_rng
from trainer.state import FILE_SUFFIX, LOGGER, PROGRESS_KEY, RNG_KEY, Checkpoint, Stateful

log = logging.getLogger(LOGGER)
_T = TypeVar("_T")

_RANK_FILE_RE = re.compile(r"-rank(\d{5})(?:-\d{5})?\.pt$")
# The file of the sharded state that a restore needs first.
_DCP_METADATA = f"{_sharded.DCP_DIR}/{_sharded.METADATA_NAME}"


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


def newest(
    directory: Path, ranks: Ranks | None, load: Callable[[Path, int], _T | None]
) -> _T | None:
    """The first checkpoint, newest first, that ``load(path, rank)`` accepts on every rank."""
    candidates = list_step_dirs(directory)
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


def needed_files(tracked: Mapping[str, Stateful], sharded: bool) -> list[str]:
    """The files a restore of the tracked objects reads (sharded: DCP's metadata)."""
    names = [name + FILE_SUFFIX for name in tracked] + [PROGRESS_KEY + FILE_SUFFIX]
    if sharded:
        names.append(_DCP_METADATA)
    return names


def load_dir(
    path: Path,
    map_location: Any,
    rank: int,
    local: LocalCheckpoints,
    needed: list[str],
    sharded: bool,
) -> Checkpoint | None:
    """One checkpoint verified and loaded, or None (and a warning) when it fails.

    ``needed``: the files a restore reads, named when one node's part lacks them;
    ``sharded``: whether sharded state is tracked (its DCP files are then checked).
    """
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
        lacks = [n for n in needed if n not in listed]
        log.warning(
            "skipping checkpoint %s: only the part of node %r (ranks %s of %s)%s",
            path.name,
            manifest.extra.get("node"),
            manifest.extra.get("ranks"),
            manifest.extra.get("world_size"),
            f" and lacks {', '.join(lacks)}" if lacks else "",
        )
        return None
    if sharded and any(f.path.startswith(_sharded.DCP_DIR + "/") for f in manifest.files):
        problem = _sharded.problem(path, manifest)
        if problem is not None:
            log.warning("skipping checkpoint %s: %s", path.name, problem)
            local.unloadable.add(path)
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
    maybe_shard = {n for n in names if (k := shards.shard_key(n)) and k + FILE_SUFFIX in present}
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
            first_line(exc),
        )
        local.unloadable.add(path)
        return None
    local.known_good.add(path)
    log.info("loaded checkpoint %s (reason %s)", path.name, manifest.reason)
    return Checkpoint(path, manifest, state)


def verify_dir(path: Path, local: LocalCheckpoints) -> tuple[Manifest, dict[str, Any]] | None:
    """A checkpoint another library will load: every hash checked, ``progress.pt`` read."""
    try:
        manifest = load_complete(path, hash_files=True)
        progress: dict[str, Any] = {}
        if any(f.path == PROGRESS_KEY + FILE_SUFFIX for f in manifest.files):
            loaded = torch.load(path / (PROGRESS_KEY + FILE_SUFFIX), weights_only=True)
            progress = dict(loaded) if isinstance(loaded, dict) else {}
    except Exception as exc:  # a bad hash, or a progress file that does not load
        log.warning("skipping checkpoint %s: %s", path.name, first_line(exc))
        return None
    local.known_good.add(path)
    return manifest, progress


def restore_into(
    ckpt: Checkpoint,
    tracked: Mapping[str, Stateful],
    sharded: Mapping[str, Stateful],
    ranks: Ranks | None,
    *,
    rng: bool,
) -> None:
    """Load a checkpoint's state into the tracked objects (sharded ones through DCP).

    Raises :class:`CheckpointError` when it lacks a tracked object's file or its sharded
    state does not load. ``rng``: also restore this rank's RNG state.
    """
    missing = [name + FILE_SUFFIX for name in tracked if name not in ckpt.state]
    if sharded and all(f.path != _DCP_METADATA for f in ckpt.manifest.files):
        missing.append(_DCP_METADATA)
    if missing:
        raise CheckpointError(f"{ckpt.path} has no {', '.join(missing)} to restore from")
    for name, obj in tracked.items():
        obj.load_state_dict(ckpt.state[name])
    if sharded:
        try:
            _sharded.load(sharded, ckpt.path, ranks.io if ranks is not None else None)
        except Exception as exc:  # DCP raises on every rank alike
            raise CheckpointError(
                f"{ckpt.path}: the sharded state does not load: {first_line(exc)}"
            ) from exc
    if rng:
        rank = ranks.rank if ranks is not None else 0
        rng_key = RNG_KEY + rank_suffix(rank) if rank else RNG_KEY
        if rng_key in ckpt.state:
            restore_rng(ckpt.state[rng_key])
        else:
            log.warning("%s has no %s%s; RNG state not restored", ckpt.path, rng_key, FILE_SUFFIX)


def save_seconds(manifest: Manifest) -> float | None:
    """How long the save of this checkpoint took, as its manifest says (None: unknown)."""
    took = manifest.extra.get("save_seconds")
    if isinstance(took, (int, float)) and not isinstance(took, bool):
        return float(took)
    return None
