"""Large state as several files of bounded size, and back (issue 4: pipelined upload).

A top-level state value (``model``, ``optimizer``, ...) whose tensors hold at most
``shard_bytes`` is one file, ``<key>.pt``, exactly as ``torch.save(value)`` writes it.
A larger one becomes:

* ``<key>-00000.pt``, ``<key>-00001.pt``, ...: shards of at most about ``shard_bytes``
  each, every one a ``{part name: tensor}`` dict. Tensors are grouped whole in walk
  order; a tensor larger than a shard is cut into flat pieces, each its own tensor;
* ``<key>.pt``: a small index holding the value's structure with every tensor replaced
  by ``None``, and for each tensor its path in that structure, shape, dtype and parts.

Each shard is finished (renamed) before the next is written, so the supervisor can
upload the finished ones while the rest is still being written (and, with its tail
uploads, each shard's parts as they are written). Only plain
containers, strings, numbers, dtypes and tensors are pickled, so every file loads with
``torch.load(weights_only=True)``. Storage sharing between tensors of a sharded value
(tied weights) is not kept: each is saved, and loaded, as a tensor of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from trainer.snapshot import with_attrs

FILE_SUFFIX = ".pt"
INDEX_MARKER = "__spot_sharded__"
INDEX_FORMAT = "spot-sharded/1"
# 256 MiB: small enough that pipelining also works across files (a 2 GiB value is
# eight shards, a 384 MiB one two), so an uploader that waits for each file's rename
# (the classic CONTRACT §4 reading, or a writer whose files it cannot follow) lags the
# writer by one shard, ~0.1 s at the ~2.5 GB/s of 32 S3 connections; a save holds at
# most one shard's copy of a cut tensor, 256 MiB instead of 1 GiB; a shard whose upload
# must be redone costs a quarter of a gigabyte; and a frozen one (under CopyObject's
# 5 GiB) is copied server-side on its own. Large enough that each file is 16 parts of
# the daemon's 16 MiB and a 7B model with Adam (112 GB) is ~450 files, far below any
# request-rate concern (S3: 3,500 PUTs/s per prefix).
DEFAULT_SHARD_BYTES = 256 << 20

_SHARD_RE = re.compile(r"^(?P<key>.+)-(?P<index>\d{5})\.pt$")

Path_ = tuple[str | int, ...]


def shard_file_name(key: str, index: int) -> str:
    """``model-00003.pt`` for shard 3 of ``model``."""
    return f"{key}-{index:05d}{FILE_SUFFIX}"


def shard_key(name: str) -> str | None:
    """The key a file name would be a shard of (``model`` for ``model-00003.pt``), else None."""
    m = _SHARD_RE.match(name)
    return m.group("key") if m else None


def tensor_leaves(obj: Any, path: Path_ = ()) -> Iterator[tuple[Path_, torch.Tensor]]:
    """Every tensor in nested dicts, lists and tuples, with its path, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensor_leaves(v, (*path, k))
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        for i, v in enumerate(obj):
            yield from tensor_leaves(v, (*path, i))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its storage holds only it, else a copy that does.

    torch.save writes a tensor's whole storage: a small view of a large buffer would
    otherwise carry the whole buffer into its shard and break the size bound.
    """
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == _nbytes(t):
        return t
    return t.contiguous().clone()


def _strip(obj: Any, paths: set[Path_], path: Path_ = ()) -> Any:
    """``obj`` with the tensors at ``paths`` replaced by None (the index's skeleton)."""
    if path in paths:
        return None
    if isinstance(obj, dict):
        return with_attrs(obj, [(k, _strip(v, paths, (*path, k))) for k, v in obj.items()])
    if isinstance(obj, list):
        return [_strip(v, paths, (*path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(_strip(v, paths, (*path, i)) for i, v in enumerate(obj))
    return obj


def _fill(skeleton: Any, tensors: dict[Path_, torch.Tensor], path: Path_ = ()) -> Any:
    """The inverse of :func:`_strip`."""
    if path in tensors:
        return tensors[path]
    if isinstance(skeleton, dict):
        return with_attrs(
            skeleton, [(k, _fill(v, tensors, (*path, k))) for k, v in skeleton.items()]
        )
    if isinstance(skeleton, list):
        return [_fill(v, tensors, (*path, i)) for i, v in enumerate(skeleton)]
    if isinstance(skeleton, tuple):
        return tuple(_fill(v, tensors, (*path, i)) for i, v in enumerate(skeleton))
    return skeleton


@dataclass(frozen=True)
class _Part:
    """A tensor whole (``count`` None) or elements ``[start, start+count)`` of its flat form."""

    tensor: int
    name: str
    start: int = 0
    count: int | None = None


def _plan(tensors: list[torch.Tensor], shard_bytes: int) -> list[list[_Part]]:
    """Group tensors into shards of at most ``shard_bytes``; cut those larger than a shard."""
    shards: list[list[_Part]] = []
    current: list[_Part] = []
    used = 0
    for ti, t in enumerate(tensors):
        size = _nbytes(t)
        if size <= shard_bytes:
            if used + size > shard_bytes and current:
                shards.append(current)
                current, used = [], 0
            current.append(_Part(ti, str(ti)))
            used += size
            continue
        if current:
            shards.append(current)
            current, used = [], 0
        per = max(1, shard_bytes // t.element_size())
        numel = t.numel()
        for ci, start in enumerate(range(0, numel, per)):
            count = min(per, numel - start)
            part = _Part(ti, f"{ti}.{ci}", start, count)
            if start + count < numel:
                shards.append([part])
            else:  # the last piece may share its shard with the tensors that follow
                current, used = [part], count * t.element_size()
    if current:
        shards.append(current)
    return shards


def file_names(key: str, value: Any, shard_bytes: int) -> list[str]:
    """The names :func:`files_for` would write for ``value``, without copying anything."""
    tensors = [t for _, t in tensor_leaves(value)]
    if sum(_nbytes(t) for t in tensors) <= shard_bytes:
        return [key + FILE_SUFFIX]
    count = len(_plan(tensors, shard_bytes))
    return [shard_file_name(key, i) for i in range(count)] + [key + FILE_SUFFIX]


def files_for(key: str, value: Any, shard_bytes: int) -> list[tuple[str, Callable[[], Any]]]:
    """``(file name, make object to torch.save)`` for one top-level value, in write order.

    The objects are made one at a time, when called: a piece cut from a large tensor is
    copied only while its own file is written, so at most one shard's copy is alive.
    """
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    leaves = list(tensor_leaves(value))
    tensors = [t for _, t in leaves]
    if sum(_nbytes(t) for t in tensors) <= shard_bytes:
        return [(key + FILE_SUFFIX, lambda: value)]
    shards = _plan(tensors, shard_bytes)
    entries: list[dict[str, Any]] = [
        {"path": list(p), "shape": list(t.shape), "dtype": t.dtype, "parts": []} for p, t in leaves
    ]
    out: list[tuple[str, Callable[[], Any]]] = []
    for si, parts in enumerate(shards):
        name = shard_file_name(key, si)
        for part in parts:
            entries[part.tensor]["parts"].append(
                [name, part.name, part.start, -1 if part.count is None else part.count]
            )
        out.append((name, _shard_maker(tensors, parts)))
    index = {
        INDEX_MARKER: INDEX_FORMAT,
        "tree": _strip(value, {p for p, _ in leaves}),
        "tensors": entries,
    }
    out.append((key + FILE_SUFFIX, lambda: index))
    return out


def _shard_maker(tensors: list[torch.Tensor], parts: list[_Part]) -> Callable[[], Any]:
    def make() -> dict[str, torch.Tensor]:
        shard: dict[str, torch.Tensor] = {}
        for part in parts:
            t = tensors[part.tensor]
            if part.count is None:
                shard[part.name] = _compact(t.detach())
            else:
                flat = t.detach().reshape(-1)  # a view when contiguous, as state is
                # clone(): a narrow() view would drag the whole storage into the file.
                shard[part.name] = flat.narrow(0, part.start, part.count).clone()
        return shard

    return make


def is_index(obj: Any) -> bool:
    """Whether a loaded ``<key>.pt`` is the index of a sharded value."""
    return isinstance(obj, dict) and obj.get(INDEX_MARKER) == INDEX_FORMAT


def index_files(index: dict[str, Any]) -> list[str]:
    """The shard files an index refers to, in order."""
    names: list[str] = []
    for entry in index["tensors"]:
        for part in entry["parts"]:
            if part[0] not in names:
                names.append(str(part[0]))
    return names


def assemble(index: dict[str, Any], load: Callable[[str], Any]) -> Any:
    """Rebuild a sharded value from its index, loading each shard once with ``load(name)``.

    A tensor cut into pieces is allocated once and filled piece by piece, so the peak
    is the value itself plus one shard.
    """
    entries = index["tensors"]
    result: dict[Path_, torch.Tensor] = {}
    # Which tensors each file feeds, so each shard is loaded once and dropped after.
    for name in index_files(index):
        shard = load(name)
        if not isinstance(shard, dict):
            raise ValueError(f"{name} is not a shard (a dict of tensors)")
        for entry in entries:
            path = tuple(entry["path"])
            for fname, part_name, start, count in entry["parts"]:
                if fname != name:
                    continue
                piece = shard.get(part_name)
                if not isinstance(piece, torch.Tensor):
                    raise ValueError(f"{name} has no tensor {part_name!r}")
                if count < 0:
                    result[path] = piece
                    continue
                whole = result.get(path)
                if whole is None:
                    numel = 1
                    for d in entry["shape"]:
                        numel *= int(d)
                    whole = torch.empty(numel, dtype=entry["dtype"], device=piece.device)
                    result[path] = whole
                whole.narrow(0, int(start), int(count)).copy_(piece)
        del shard
    tensors: dict[Path_, torch.Tensor] = {}
    for entry in entries:
        path = tuple(entry["path"])
        t = result.get(path)
        if t is None:
            raise ValueError(f"no shard holds the tensor at {list(path)}")
        split = any(int(p[3]) >= 0 for p in entry["parts"])
        if split and sum(int(p[3]) for p in entry["parts"]) != t.numel():
            raise ValueError(f"the pieces of the tensor at {list(path)} do not cover it")
        tensors[path] = t.view(entry["shape"]) if split else t
    return _fill(index["tree"], tensors)
