"""What a checkpoint holds, in the terms every part of the manager shares.

The names (environment variables, the keys the manager fills itself, the ``.pt`` file
suffix), the rule for a state key and for the values a checkpoint may hold (what
``torch.load(weights_only=True)`` takes back without an allowlist), and what loading
hands back (:class:`Checkpoint`, :class:`Resume`). Plain definitions: no I/O here.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from daemon.layout import REASONS, Manifest
from trainer import shards

# The logger of the checkpoint machinery, whichever of its modules logs: the name users
# (and the tests) configure, from before the manager was split into modules.
LOGGER = "trainer.checkpoint"

CHECKPOINT_DIR_ENV = "SPOT_CHECKPOINT_DIR"
RUN_ID_ENV = "SPOT_RUN_ID"
DEFAULT_RUN_ID = "local"
FILE_SUFFIX = shards.FILE_SUFFIX
DEFAULT_SHARD_BYTES = shards.DEFAULT_SHARD_BYTES
# Keys the manager fills itself in every snapshot; tracked objects may not use them.
RNG_KEY = "rng"
PROGRESS_KEY = "progress"

_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")

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


def check_reason(reason: str) -> None:
    """Raise ValueError unless ``reason`` is one of CONTRACT §4's."""
    if reason not in REASONS:
        raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")


def check_name(name: str) -> None:
    """Raise ValueError unless ``name`` can name a tracked object (``<name>.pt``)."""
    if name in (RNG_KEY, PROGRESS_KEY) or not _KEY_RE.match(name):
        raise ValueError(f"{name!r} cannot name a tracked object")


def check_plain(obj: Any, where: str) -> None:
    """Raise TypeError naming the first value weights_only loading would refuse."""
    if isinstance(obj, _PLAIN_LEAVES):
        return
    # Exact types: subclasses (defaultdict, namedtuples) are not on torch's allowlist.
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}")
            check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, set, torch.Size):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) refuses; store it as tensors, numbers, strings, "
        "lists or dicts"
    )


def check_state(state: Mapping[str, Any], reason: str, shard_bytes: int) -> None:
    """Refuse, before anything is written, a state or reason a checkpoint cannot hold.

    Each key must name a file, each value load back with ``weights_only=True``, and no
    two keys may write the same file (a key and another key's shards).
    """
    check_reason(reason)
    names: set[str] = set()
    for key, value in state.items():
        if not _KEY_RE.match(key):
            raise ValueError(f"state key {key!r} cannot name a checkpoint file")
        check_plain(value, key)
        for name in shards.file_names(key, value, shard_bytes):
            if name in names:
                raise ValueError(f"two state keys would both write {name}")
            names.add(name)
