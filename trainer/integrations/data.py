"""Data loading that resumes mid-epoch exactly: torch only, for any framework.

Resuming bit for bit needs two things from the data pipeline, which a plain
``DataLoader(shuffle=True)`` has neither of:

* each epoch's order must be recomputable: :class:`ResumableSampler` draws it from a
  generator seeded by (seed, epoch) alone (a ``DistributedSampler`` underneath, so
  frameworks that add one under ``torch.distributed`` leave it as it is);
* the batches already trained in the interrupted epoch must be skipped, and nothing
  else drawn: :class:`ResumableDataLoader` reports ``state_dict() == {"epoch": e,
  "batches": k}`` (batches handed out since its epoch began) and, after
  ``load_state_dict``, starts its next iteration in epoch ``e`` after those ``k``
  batches. They are skipped in the index sampler, so no sample is loaded for them.
  Starting an iteration draws nothing from the global RNG (a plain ``DataLoader``
  draws a worker seed from it each epoch), so the dropout stream of a resumed run is
  the one of a run never interrupted.

Lightning saves and restores a loader with ``state_dict`` / ``load_state_dict`` in its
checkpoints by itself; a sized loader is not read ahead by Lightning, so the count is
the count of batches trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler


def _seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (1 << 63)


class ResumableSampler(DistributedSampler[Any]):
    """A sampler whose order in epoch ``e`` depends on (seed, e) only.

    A :class:`~torch.utils.data.DistributedSampler` (shuffled with a generator seeded by
    ``seed + epoch``); without ``num_replicas`` / ``rank`` it takes them from
    ``torch.distributed`` when that is initialized, else it is the only replica. The
    framework (or the loop) calls ``set_epoch(e)`` at each epoch's start.
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:
            initialized = dist.is_available() and dist.is_initialized()
            num_replicas = dist.get_world_size() if initialized else 1
            rank = dist.get_rank() if initialized else 0
        # DistributedSampler only needs len() of the dataset.
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )


class _SkipFirst(Sampler[Any]):
    """The index batches of ``inner`` after its first ``skip`` (no data is loaded for those)."""

    def __init__(self, inner: Iterable[Any], skip: int) -> None:
        self.inner = inner
        self.skip = skip

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.inner)
        for _ in range(self.skip):
            if next(it, None) is None:
                return
        yield from it

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


class _Counting(Iterator[Any]):
    def __init__(self, inner: Iterator[Any], state: dict[str, int]) -> None:
        self.inner = inner
        self.state = state

    def __iter__(self) -> _Counting:
        return self

    def __next__(self) -> Any:
        batch = next(self.inner)
        self.state["batches"] += 1
        return batch


class ResumableDataLoader(DataLoader[Any]):
    """A ``DataLoader`` that can start an epoch after the batches an interrupted run trained.

    Arguments are ``DataLoader``'s, plus ``seed`` for the generator each iteration
    draws its worker seed from (seeded by (seed, epoch), never the global RNG). Give it
    a sampler whose order depends on the epoch only (:class:`ResumableSampler`).
    ``persistent_workers`` is not supported (a kept worker iterator ignores the skip).
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("ResumableDataLoader does not support persistent_workers")
        super().__init__(*args, **kwargs)
        self.seed = seed
        self._position: dict[str, int] = {"epoch": self._sampler_epoch(), "batches": 0}
        self._pending: tuple[int, int] | None = None
        self._skip_now = 0

    def _sampler_epoch(self) -> int:
        epoch = getattr(self.sampler, "epoch", 0)
        return int(epoch) if isinstance(epoch, int) else 0

    @property
    def _index_sampler(self) -> Any:
        inner = super()._index_sampler
        return _SkipFirst(inner, self._skip_now) if self._skip_now else inner

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        epoch, skip = self._sampler_epoch(), 0
        if self._pending is not None:
            epoch, skip = self._pending
            self._pending = None
            if skip >= len(self):  # saved after the epoch's last batch: the next one begins
                epoch, skip = epoch + 1, 0
            set_epoch = getattr(self.sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
        self.generator = torch.Generator().manual_seed(_seed(self.seed, epoch))
        self._position = {"epoch": epoch, "batches": skip}
        self._skip_now = skip
        try:
            inner = super().__iter__()
        finally:
            self._skip_now = 0
        return _Counting(iter(inner), self._position)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "batches": k}``: k batches of epoch e handed out so far."""
        return dict(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration start in ``state["epoch"]`` after ``state["batches"]``."""
        self._pending = (int(state["epoch"]), int(state["batches"]))
