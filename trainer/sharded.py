"""Sharded state (FSDP2, DTensor) in a checkpoint, through ``torch.distributed.checkpoint``.

A model sharded across ranks has no one rank holding all of it, so it cannot go into a
``torch.save`` file like the replicated state. Objects registered with
:meth:`trainer.CheckpointManager.track_sharded` (or ``restore(..., sharded=...)``) are
saved with DCP instead: each rank writes its own shards and global rank 0 writes DCP's
``.metadata``, all under ``dcp/`` in the checkpoint (every rank into its own node's
checkpoint directory), each file listed in that node's manifest with its sha256::

    step-000001200/dcp/.metadata        (rank 0's node)
    step-000001200/dcp/__0_0.distcp     (rank 0's shards)
    step-000001200/dcp/__1_0.distcp     (rank 1's shards, on rank 1's node)

DCP's ``FileSystemWriter`` (torch 2.13) writes each data file under its final name
directly and the metadata as ``.metadata.tmp`` renamed to ``.metadata``; our rule is
that a file under its final name inside ``.tmp-step-*`` is finished, because the
supervisor uploads it at once. So DCP writes into a scratch directory outside any
``.tmp-step-*`` one (``<local_dir>/.dcp-scratch-step-<9 digits>-<pid>-<random>/``,
swept like a stale ``.tmp-`` directory when its writer is gone), and after
``dcp.save`` returns each rank hashes its files (fsynced by DCP) and renames them into
its node's ``.tmp-step-*/dcp/``: a rename on one filesystem, so a file appears there
only whole.

Loading (the node then holds the whole global checkpoint) is ``dcp.load`` into the
objects' current ``state_dict()`` and then their ``load_state_dict``. Checkpoints can
come from a bucket, so nothing is unpickled freely: ``.metadata`` goes through an
allowlist of DCP's own metadata classes, and non-tensor values through
``torch.load(weights_only=True)`` (DCP's default planner would use
``weights_only=False``); tensors DCP already reads with ``weights_only=True``.

A model with its optimizer is registered as one :class:`ModelState`, which uses DCP's
``get_state_dict`` / ``set_state_dict`` (optimizer state keyed by parameter names, and
initialized before loading into it).
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from daemon.layout import FileEntry, Manifest, sha256_file, step_dir_name

# torch.distributed.checkpoint is imported where it is used: it adds about 0.6 s to the
# start of every trainer, most of which never track sharded state.
if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

# The directory inside a checkpoint that holds the DCP files.
DCP_DIR = "dcp"
METADATA_NAME = ".metadata"
SCRATCH_PREFIX = ".dcp-scratch-"
_SCRATCH_RE = re.compile(r"^\.dcp-scratch-step-\d{9}-(\d+)-.+$")


def scratch_pid(name: str) -> int | None:
    """The writer pid of a ``.dcp-scratch-step-<9 digits>-<pid>-<random>`` name, else None."""
    m = _SCRATCH_RE.match(name)
    return int(m.group(1)) if m else None


def state_of(objects: Mapping[str, Any]) -> dict[str, Any]:
    """Each sharded object's ``state_dict()``, under its name (references live tensors)."""
    return {name: obj.state_dict() for name, obj in objects.items()}


def cpu_copy(obj: Any) -> Any:
    """A copy of a (sharded) state in CPU memory, for a background save.

    A DTensor stays a DTensor (same mesh, placements and global shape) over a CPU copy of
    its local shard: DCP needs the placement to know which part of the whole it holds.
    Not pooled like :mod:`trainer.snapshot`: each save allocates its copy afresh.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(cpu_copy(v) for v in obj)
    return obj  # numbers, strings, None: immutable


def save(
    state: dict[str, Any],
    tmp_dir: Path,
    local_dir: Path,
    step: int,
    process_group: Any = None,
) -> list[FileEntry]:
    """``dcp.save`` ``state``, then move this rank's finished files into ``tmp_dir/dcp/``.

    Collective: every rank of ``process_group`` calls it for the same step. Returns the
    entries (``dcp/<name>``, size, sha256) of the files this rank moved: its own shards,
    and on the coordinator ``.metadata``.
    """
    scratch = local_dir / (
        f"{SCRATCH_PREFIX}{step_dir_name(step)}-{os.getpid()}-{os.urandom(4).hex()}"
    )
    try:
        # DCP makes the directory itself (inside its collective error handling, so a
        # failure here fails the save on every rank instead of leaving them waiting).
        from torch.distributed.checkpoint.filesystem import FileSystemWriter
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        writer = FileSystemWriter(scratch, single_file_per_rank=True, sync_files=True)
        dcp_save(state, storage_writer=writer, process_group=process_group)
        dest = tmp_dir / DCP_DIR
        dest.mkdir(exist_ok=True)  # the ranks of one node race to make it
        entries = []
        for name in sorted(os.listdir(scratch)):
            src = scratch / name
            entry = FileEntry(f"{DCP_DIR}/{name}", src.stat().st_size, sha256_file(src))
            os.rename(src, dest / name)
            entries.append(entry)
        return entries
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# Everything a DCP ``.metadata`` of torch 2.13 needs to unpickle; nothing that runs code.
_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP .metadata")


def read_metadata(dcp_dir: Path) -> Metadata:
    """DCP's ``.metadata`` of ``dcp_dir``, unpickled through the allowlist."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(dcp_dir / METADATA_NAME, "rb") as f:
        md = _MetadataUnpickler(f).load()
    if not isinstance(md, Metadata):
        raise pickle.UnpicklingError(f"{dcp_dir / METADATA_NAME} holds no DCP Metadata")
    return md


def problem(ckpt_dir: Path, manifest: Manifest) -> str | None:
    """Why the DCP part of a verified checkpoint cannot be loaded, or None when it can.

    It can when the manifest lists ``dcp/.metadata`` and every file that metadata refers
    to (a node's own part of a multi-node save lacks the other nodes' shards).
    """
    listed = {f.path for f in manifest.files}
    if f"{DCP_DIR}/{METADATA_NAME}" not in listed:
        return f"it has no {DCP_DIR}/{METADATA_NAME}"
    try:
        md = read_metadata(ckpt_dir / DCP_DIR)
    except Exception as exc:  # any unpickling failure: not a checkpoint we can use
        return f"{DCP_DIR}/{METADATA_NAME} does not load: {type(exc).__name__}: {exc}"
    needed = {
        f"{DCP_DIR}/{info.relative_path}"
        for info in (md.storage_data or {}).values()
        if hasattr(info, "relative_path")
    }
    missing = sorted(needed - listed)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return f"it lacks the sharded state's {', '.join(missing[:3])}{more}"
    return None


@functools.cache
def _safe_io() -> tuple[type[Any], type[Any]]:
    """DCP's file reader and default load planner, made safe for files from a bucket.

    The reader unpickles ``.metadata`` through the allowlist; the planner reads
    non-tensor values with ``weights_only=True`` (what ``DefaultLoadPlanner.load_bytes``
    does in torch 2.13, but for the unpickling). Made on first use (import cost).
    """
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import ReadItem

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            md = read_metadata(Path(self.path))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            assert md.storage_meta is not None
            md.storage_meta.load_id = self.load_id
            return md

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeReader, SafeLoadPlanner


def load(objects: Mapping[str, Any], ckpt_dir: Path, process_group: Any = None) -> None:
    """``dcp.load`` the checkpoint's sharded state into ``objects`` (collective).

    Each object's current ``state_dict()`` is the template (its shards say which parts
    this rank reads); the loaded values then go through its ``load_state_dict``.
    """
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    reader, planner = _safe_io()
    state = state_of(objects)
    dcp_load(
        state,
        storage_reader=reader(ckpt_dir / DCP_DIR),
        planner=planner(),
        process_group=process_group,
    )
    for name, obj in objects.items():
        obj.load_state_dict(state[name])


class ModelState:
    """A model (FSDP2-sharded or not) and its optimizers, as one object to track sharded.

    ``state_dict()`` is ``{"model": ..., "optim": ...}`` from DCP's ``get_state_dict``:
    DTensor shards, optimizer state keyed by parameter name. ``load_state_dict`` puts
    them back with ``set_state_dict``. Both run on the training thread, at the same
    point on every rank (they may use the model's own process group).
    """

    def __init__(self, model: nn.Module, *optimizers: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizers: tuple[torch.optim.Optimizer, ...] = optimizers

    def state_dict(self) -> dict[str, Any]:
        """The model's and optimizers' sharded state dicts."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if not self.optimizers:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, _opts(self.optimizers))
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Load what :meth:`state_dict` returned (after ``dcp.load`` filled it)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if not self.optimizers:
            set_model_state_dict(self.model, state_dict["model"])
            return
        set_state_dict(
            self.model,
            _opts(self.optimizers),
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


def _opts(
    optimizers: tuple[torch.optim.Optimizer, ...],
) -> torch.optim.Optimizer | Iterable[torch.optim.Optimizer]:
    return optimizers[0] if len(optimizers) == 1 else optimizers
