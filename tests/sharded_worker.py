"""One rank of a small FSDP2 job (gloo on CPU) that checkpoints through the manager.

Started by test_trainer_multinode.py as plain processes (no torchrun) with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``GROUP_RANK`` (its node) and
``SPOT_CHECKPOINT_DIR`` (its node's directory). Not a test module.

    sharded_worker.py save STEPS OUT     train STEPS steps, a save at every step (the
                                         last one final), record each step's shards
    sharded_worker.py resume OUT         restore, record the restored shards; node 1
                                         drops its part of step 5 (as if it was never
                                         there), then one more step, saved as final

OUT (one JSON per rank) gets ``{"hashes": {step: sha256 of this rank's local shards},
"prune_calls": n, "failed_save": message, "resumed": step}``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from trainer import CheckpointError, CheckpointManager
from trainer.sharded import ModelState


def shards_sha256(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """sha256 over this rank's local shards of every parameter and optimizer state tensor."""
    h = hashlib.sha256()

    def add(t: torch.Tensor) -> None:
        local = t.to_local() if isinstance(t, DTensor) else t
        h.update(local.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    for name, p in model.named_parameters():
        h.update(name.encode())
        add(p)
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                add(value)
    return h.hexdigest()


def main() -> int:
    mode, rest = sys.argv[1], sys.argv[2:]
    out_path = Path(rest[-1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    # A different initialization per phase: a restore that loaded nothing would show.
    torch.manual_seed(1 if mode == "save" else 2)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(7)
    x, y = torch.randn(24, 8, generator=data), torch.randn(24, 3, generator=data)

    def train_step() -> None:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[rank::world]), y[rank::world])
        loss.backward()
        optimizer.step()

    ckpt = CheckpointManager(keep=2, save_every=1, handle_signals=False)
    prune_calls = 0
    real_prune = ckpt.prune

    def counting_prune() -> None:
        nonlocal prune_calls
        prune_calls += 1
        real_prune()

    ckpt.prune = counting_prune  # type: ignore[method-assign]
    report: dict[str, Any] = {"hashes": {}}
    resume = ckpt.restore(rng=False, sharded={"train": ModelState(model, optimizer)})
    step = resume.step
    report["resumed"] = step
    report["hashes"][step] = shards_sha256(model, optimizer)
    if mode == "save":
        total = int(rest[0])
        # Periodic saves run in the background (DCP on the manager's io group) while
        # the next step's FSDP collectives run on the default group.
        while not ckpt.step_done(step, final=step == total):
            train_step()
            step += 1
            report["hashes"][step] = shards_sha256(model, optimizer)
        # A save that fails on one rank of one node fails on every rank, and leaves
        # no step directory on any node.
        if rank == 2:

            def broken(*_: Any, **__: Any) -> Any:
                raise OSError(28, "No space left on device")

            ckpt._write_files = broken  # type: ignore[method-assign]
        try:
            ckpt.save(total + 100, ckpt.snapshot(total + 100), "requested")
        except CheckpointError as exc:
            report["failed_save"] = str(exc)
    else:
        if rank == 2:
            shutil.rmtree(ckpt.directory / "step-000000005", ignore_errors=True)
        dist.barrier()
        train_step()
        step += 1
        ckpt.step_done(step, final=True)
    ckpt.close()
    report["prune_calls"] = prune_calls
    out_path.write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
