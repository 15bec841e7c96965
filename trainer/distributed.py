"""What the checkpoint manager needs from ``torch.distributed``, in one place.

Two gloo process groups of their own, created together by every rank the first time
the manager needs them (``restore`` or the first ``step_done``, which every rank calls
at the same point of the program):

* ``flags``: used only by the training thread: one small all_reduce per step boundary
  agrees on stop / save / skip, so every rank saves the same step even when only one
  was signalled (on whichever node); and the agreement on which checkpoint to restore.
* ``io``: used only by whichever thread writes a checkpoint (at most one save is in
  flight, so never two at once): the per-node save protocol (:mod:`trainer.nodes`)
  and the DCP save of sharded state (:mod:`trainer.sharded`).

Collectives issued from two threads on one group could be matched up in a different
order on different ranks; separate groups keep the two streams apart. gloo works on
CPU tensors whatever backend the training itself uses (NCCL included).

Ranks are grouped by node: each node (instance) has its own ``$SPOT_CHECKPOINT_DIR`` on
its own disk, so a rank may only write where its node can see. A rank's node key is
torchrun's ``GROUP_RANK`` (the node rank) when set, else the hostname; every rank learns
every rank's key with one all_gather_object when the groups are made. The lowest global
rank of each node is that node's leader: it builds and commits the node's checkpoint
directory and prunes the node's old ones.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# torchrun sets it to this agent's node rank (0 .. nnodes-1) in every worker.
NODE_ENV = "GROUP_RANK"


def node_key() -> str:
    """This process's node: torchrun's ``GROUP_RANK`` when set, else the hostname.

    ``GROUP_RANK`` first: two agents on one machine (a test, or two "nodes" sharing a
    host) are two nodes with two checkpoint directories although the hostname is one.
    """
    group = os.environ.get(NODE_ENV, "").strip()
    return group if group else socket.gethostname()


@dataclass
class Ranks:
    """This process's place in the job, its node, and the manager's two process groups."""

    rank: int
    world_size: int
    flags: Any  # dist.ProcessGroup; typed loosely because its stubs vary across releases
    io: Any
    # The node key of every global rank, in rank order.
    nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes = ("",) * self.world_size  # one node (callers that know no better)
        if len(self.nodes) != self.world_size:
            raise ValueError(f"{len(self.nodes)} node keys for a world of {self.world_size}")

    @property
    def is_writer(self) -> bool:
        """Global rank 0 writes the replicated state (model, optimizer, progress ...)."""
        return self.rank == 0

    @property
    def node(self) -> str:
        """This rank's node key."""
        return self.nodes[self.rank]

    def ranks_of(self, node: str) -> list[int]:
        """The global ranks on ``node``, ascending."""
        return [r for r, n in enumerate(self.nodes) if n == node]

    @property
    def node_ranks(self) -> list[int]:
        """The global ranks on this rank's node, ascending (this one among them)."""
        return self.ranks_of(self.node)

    @property
    def leader(self) -> int:
        """The lowest global rank on this node: it commits the node's checkpoint."""
        return self.node_ranks[0]

    @property
    def is_leader(self) -> bool:
        """This rank builds, commits and prunes its node's checkpoint directories."""
        return self.rank == self.leader

    @property
    def leaders(self) -> list[int]:
        """Each node's leader, ascending (global rank 0 is always the first)."""
        return sorted({self.ranks_of(n)[0] for n in self.nodes})

    @property
    def node_count(self) -> int:
        """How many nodes the job spans."""
        return len(set(self.nodes))

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

    Creates the two process groups and learns every rank's node (one all_gather_object):
    every rank must call this at the same point.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    flags = dist.new_group(backend="gloo")
    io = dist.new_group(backend="gloo")
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node_key(), group=io)
    return Ranks(dist.get_rank(), world, flags, io, tuple(str(n) for n in nodes))


def rank_suffix(rank: int) -> str:
    """``-rank00001``: appended to the key of state each rank saves for itself."""
    return f"-rank{rank:05d}"
