"""The reference trainer: ``python -m trainer.example`` (CONTRACT §6).

A small MLP with dropout (so the RNG state matters) learns a deterministic synthetic
regression problem with AdamW and a cosine LR schedule. Mini-batches come from a
per-epoch permutation drawn from a generator seeded by (seed, epoch), so resuming needs
only (epoch, index within the epoch), never a replay of earlier batches. Interrupted
and resumed any number of times on CPU, it ends with the same parameters, bit for bit.

Periodic saves are written in the background (``--sync-save`` writes them in the loop).
Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins a gloo process group, wraps the model
in DistributedDataParallel and gives each rank its slice of every batch; only rank 0
prints, and each rank's RNG (its own dropout stream) is saved and restored. Across
several nodes (``torchrun --nnodes=N``, each node with its own ``$SPOT_CHECKPOINT_DIR``)
each node saves its own part of every checkpoint (trainer.nodes) and resumes from the
whole checkpoint its supervisor restored.

stdout, one line per event, flushed (supervisors and tests follow it):

    start step=0                       | resumed step=N reason=R
    step=N loss=F                      after each optimizer step
    checkpoint_saved step=N reason=R bytes=B
    save_skipped step=N reason=deadline   after SIGTERM, too close to the notice deadline
    stopped step=N                     after SIGTERM (state saved unless skipped); exit 0
    final_params_sha256=<64 hex>       after the last step; exit 0
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from daemon.layout import Manifest
from trainer.checkpoint import (
    CHECKPOINT_DIR_ENV,
    DEFAULT_SHARD_BYTES,
    CheckpointError,
    CheckpointManager,
)

log = logging.getLogger("trainer.example")

N_SAMPLES = 512
IN_DIM = 16
HIDDEN = 64
BATCH = 32
MIB = 1 << 20
# Only rank 0 prints: torchrun merges every rank's stdout into one.
_QUIET = int(os.environ.get("RANK", "0")) != 0


def out(line: str) -> None:
    """One progress line on stdout, flushed at once so a reader sees it at this boundary.

    One write() with its newline: the supervisor shares this stdout, and a line split
    across two writes could have one of its events land inside it.
    """
    if _QUIET:
        return
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic synthetic regression data: a fixed nonlinear target plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, IN_DIM, generator=g)
    w = torch.randn(IN_DIM, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(N_SAMPLES, 1, generator=g)
    return x, y


def epoch_order(seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: recomputable from (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(N_SAMPLES, generator=g)


def make_model() -> nn.Module:
    """The MLP; dropout makes each step draw from the torch RNG."""
    return nn.Sequential(
        nn.Linear(IN_DIM, HIDDEN),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(HIDDEN, 1),
    )


class Ballast:
    """Extra state of ``--state-mb`` MiB, saved as ``ballast.pt`` to make checkpoints large.

    One byte changes per step, so what is restored is genuine state, not a constant.
    """

    def __init__(self, mb: int, seed: int) -> None:
        self.data = self.initial(mb, seed)

    @staticmethod
    def initial(mb: int, seed: int) -> torch.Tensor:
        """Deterministic content: one random MiB repeated (drawing all of it is slow)."""
        if mb <= 0:
            return torch.zeros(0, dtype=torch.uint8)
        g = torch.Generator().manual_seed(seed + 7)
        block = torch.randint(0, 256, (MIB,), dtype=torch.uint8, generator=g)
        return block.repeat(mb)

    def touch(self, step: int) -> None:
        """Mutate one byte, a function of the step."""
        if self.data.numel():
            self.data[step % self.data.numel()] = step % 256

    def state_dict(self) -> dict[str, Any]:
        """The tensor, as-is."""
        return {"data": self.data}

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Take the saved tensor."""
        self.data = state_dict["data"].to("cpu", torch.uint8)


def params_sha256(model: nn.Module) -> str:
    """SHA-256 over the raw bytes of every tensor of ``model.state_dict()``, in order."""
    h = hashlib.sha256()
    for tensor in model.state_dict().values():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- shared by the reference scripts (trainer.example_hf, _lightning, _accelerate) ------


def flags(
    prog: str,
    description: str | None,
    *,
    save_every_help: str = "periodic checkpoint interval",
    keep_help: str = "complete checkpoints kept locally",
    state_mb: bool = True,
) -> argparse.ArgumentParser:
    """A parser with the flags every reference script takes (CONTRACT §6 and a few more)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps (default 200)")
    p.add_argument("--save-every", type=int, default=20, help=save_every_help)
    p.add_argument("--step-seconds", type=float, default=0.0, help="sleep added to each step")
    if state_mb:
        p.add_argument("--state-mb", type=int, default=0, help="extra MiB of state per checkpoint")
    p.add_argument("--seed", type=int, default=0, help="data, model and RNG seed")
    p.add_argument("--keep", type=int, default=3, help=keep_help)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument(
        "--checkpoint-dir",
        default=os.environ.get(CHECKPOINT_DIR_ENV),
        help=f"default ${CHECKPOINT_DIR_ENV}",
    )
    return p


def parse_framework_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and check a framework script's flags (bad flags exit 2, as argparse does)."""
    args = _parse(p, argv)
    if args.steps < 1 or args.save_every < 1 or args.keep < 1:
        p.error("--steps, --save-every and --keep must be at least 1")
    if "state_mb" not in args:
        if args.step_seconds < 0:
            p.error("--step-seconds must not be negative")
    elif args.step_seconds < 0 or args.state_mb < 0:
        p.error("--step-seconds and --state-mb must not be negative")
    return args


def _parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.checkpoint_dir is None:
        p.error(f"no checkpoint directory: set ${CHECKPOINT_DIR_ENV} or pass --checkpoint-dir")
    return args


def print_saved(m: Manifest) -> None:
    """The ``checkpoint_saved`` line: every reference script's ``on_save``."""
    out(f"checkpoint_saved step={m.step} reason={m.reason} bytes={m.total_bytes}")


def print_resumed(step: int, reason: str | None, total: int) -> None:
    """The ``resumed`` line; a checkpoint beyond ``--steps`` is an error."""
    out(f"resumed step={step} reason={reason}")
    if step > total:
        raise CheckpointError(f"checkpoint step {step} is beyond --steps {total}")


def print_end(stopped: bool, step: int, skipped_step: int | None, model: nn.Module) -> None:
    """The last line: ``stopped`` (after ``save_skipped``, when so), else the final hash."""
    if stopped:
        if skipped_step == step:
            out(f"save_skipped step={step} reason=deadline")
        out(f"stopped step={step}")
    else:
        out(f"final_params_sha256={params_sha256(model)}")


def log_to_stderr() -> None:
    """Log lines on stderr (stdout carries the event lines), at ``$TRAINER_LOG_LEVEL``."""
    logging.basicConfig(
        level=os.environ.get("TRAINER_LOG_LEVEL", "INFO"),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run(train: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``train(args)``; a failure is one ``error:`` line on stderr and exit status 1."""
    try:
        return train(args)
    except (CheckpointError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


def script_main(
    train: Callable[[argparse.Namespace], int],
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    argv: list[str] | None,
) -> int:
    """A reference script's entry point: log lines on stderr, ``train(parse_args(argv))``;
    a failure is one ``error:`` line on stderr and exit status 1."""
    log_to_stderr()
    return run(train, parse_args(argv))


# -- the reference trainer ---------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (bad flags exit 2, as argparse does)."""
    p = flags("python -m trainer.example", "The reference trainer.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--sync-save", action="store_true", help="write periodic saves in the loop, not behind it"
    )
    p.add_argument(
        "--shard-mb",
        type=int,
        default=DEFAULT_SHARD_BYTES // MIB,
        help=(
            "largest file of a checkpoint, MiB; larger state is split "
            f"(default {DEFAULT_SHARD_BYTES // MIB}, see trainer.shards)"
        ),
    )
    args = _parse(p, argv)
    for flag in ("steps", "state_mb", "seed"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must not be negative")
    if args.save_every < 1 or args.keep < 1 or args.shard_mb < 1:
        p.error("--save-every, --keep and --shard-mb must be at least 1")
    if args.step_seconds < 0:
        p.error("--step-seconds must not be negative")
    return args


def train(args: argparse.Namespace) -> int:
    """Restore, train to ``--steps`` (or until SIGTERM), return the exit status."""
    # First, so the SIGTERM / SIGUSR1 handlers are in place as early as possible.
    ckpt = CheckpointManager(
        args.checkpoint_dir,
        keep=args.keep,
        save_every=args.save_every,
        on_save=print_saved,
        async_save=not args.sync_save,
        shard_bytes=args.shard_mb * MIB,
    )
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # gloo: CPU tensors, and what the tests can run; NCCL would serve CUDA as well.
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    # Per rank: each rank's dropout draws its own stream (its own RNG state to restore).
    torch.manual_seed(args.seed + rank)
    x_all, y_all = (t.to(device) for t in make_data(args.seed))
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.steps, 1))
    ballast = Ballast(args.state_mb, args.seed)

    resume = ckpt.restore(model, optimizer, scheduler, map_location=device, ballast=ballast)
    step = resume.step
    epoch = int(resume.progress.get("epoch", 0))
    index = int(resume.progress.get("index", 0))
    if resume.resumed:
        print_resumed(step, resume.reason, args.steps)
        if ballast.data.numel() != args.state_mb * MIB:
            # Ballast only sizes the checkpoint; follow the flag, not the old run.
            ballast.data = Ballast.initial(args.state_mb, args.seed)
    else:
        out("start step=0")

    steps_per_epoch = N_SAMPLES // BATCH
    loss_fn = nn.MSELoss()
    order, order_epoch = epoch_order(args.seed, epoch).to(device), epoch
    # After restore: every rank holds the same parameters, which DDP checks on entry.
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net.train()
    # The boundary we start from counts too: a SIGTERM during startup stops here.
    while not ckpt.step_done(step, final=step >= args.steps, epoch=epoch, index=index):
        if order_epoch != epoch:
            order, order_epoch = epoch_order(args.seed, epoch).to(device), epoch
        batch = order[index * BATCH : (index + 1) * BATCH][rank::world]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x_all[batch]), y_all[batch])
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        ballast.touch(step)
        index += 1
        if index == steps_per_epoch:
            epoch, index = epoch + 1, 0
        out(f"step={step} loss={loss.item():.6f}")
        if args.step_seconds:
            time.sleep(args.step_seconds)
    # The handlers stay installed until exit (no ckpt.close()): a SIGTERM arriving
    # while the last line is printed must not turn a finished run into exit -15.
    print_end(step < args.steps, step, ckpt.skipped_step, model)
    if world > 1:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; non-zero with one clear ``error:`` line on stderr on failure."""
    return script_main(train, parse_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
