"""What the checkpoint manager needs from ``torch.distributed``, in one place.

Two gloo process groups of their own, created together by every rank the first time
the manager needs them (``restore`` or the first ``step_done``, which every rank calls
at the same point of the program):

* ``flags``: used only by the training thread: one small all_reduce per step boundary
  agrees on stop / save / skip, so every rank saves the same step even when only one
  was signalled; and the agreement on which checkpoint to restore.
* ``io``: used only by whichever thread writes a checkpoint (at most one save is in
  flight, so never two at once): the temporary directory's name, each rank's file
  list, and the outcome of the commit.

Collectives issued from two threads on one group could be matched up in a different
order on different ranks; separate groups keep the two streams apart. gloo works on
CPU tensors whatever backend the training itself uses (NCCL included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """This process's place in the job, and the manager's two process groups."""

    rank: int
    world_size: int
    flags: Any  # dist.ProcessGroup; typed loosely because its stubs vary across releases
    io: Any

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the shared files and the manifest, and prunes."""
        return self.rank == 0

    def agree_max(self, values: list[int]) -> list[int]:
        """The element-wise maximum of ``values`` over all ranks (one all_reduce)."""
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.flags)
        return [int(v) for v in t.tolist()]

    def agree_min(self, value: int) -> int:
        """The minimum of ``value`` over all ranks."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.flags)
        return int(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (on the io group)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.io)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (on the io group)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.io)
        return out


def detect() -> Ranks | None:
    """The job's ranks when ``torch.distributed`` is initialized with two or more; else None.

    Creates the two process groups: every rank must call this at the same point.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    flags = dist.new_group(backend="gloo")
    io = dist.new_group(backend="gloo")
    return Ranks(dist.get_rank(), world, flags, io)


def rank_suffix(rank: int) -> str:
    """``-rank00001``: appended to the key of state each rank saves for itself."""
    return f"-rank{rank:05d}"
