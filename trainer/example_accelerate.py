"""The Accelerate recipe, runnable: ``python -m trainer.example_accelerate``.

Accelerate needs no callback: the loop is yours, so :class:`trainer.CheckpointManager`
drives it as in ``python -m trainer.example``, with ``save_dir=accelerator.save_state``:
at each save the manager hands ``save_state`` an empty staging directory, then commits
what it wrote (plus ``progress.pt``: epoch and index) as a verified ``step-<9 digits>/``.
On resume, ``ckpt.restore()`` returns the newest verified checkpoint's path for
``accelerator.load_state`` (model, optimizer, scheduler, RNG states) and the progress for
``skip_first_batches``::

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=seed))      # each epoch's order: seed + epoch
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ckpt = CheckpointManager(save_every=500, save_dir=accelerator.save_state)
    resume = ckpt.restore()
    if resume.resumed:
        accelerator.load_state(str(resume.path))
    step = resume.step
    epoch, index = resume.progress.get("epoch", 0), resume.progress.get("index", 0)
    stop = ckpt.step_done(step, final=step >= total, epoch=epoch, index=index)
    while not stop:
        loader.set_epoch(epoch)
        for batch in skip_first_batches(loader, index) if index else loader:
            ...  # forward, accelerator.backward(loss), optimizer.step(), scheduler.step()
            step, index = step + 1, index + 1
            if index == len(loader):
                epoch, index = epoch + 1, 0
            if ckpt.step_done(step, final=step >= total, epoch=epoch, index=index):
                stop = True
                break

The data loader is given a ``generator``: starting an iteration then draws its worker
seed from it instead of the global RNG, so the dropout stream after a resume is the one
of a run never interrupted. Same flags and stdout lines as ``python -m trainer.example``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, skip_first_batches
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer.checkpoint import CheckpointManager
from trainer.example import (
    BATCH,
    flags,
    make_data,
    make_model,
    out,
    parse_framework_args,
    print_end,
    print_resumed,
    print_saved,
    script_main,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags of ``python -m trainer.example`` that apply here."""
    p = flags("python -m trainer.example_accelerate", __doc__, state_mb=False)
    return parse_framework_args(p, argv)


def train(args: argparse.Namespace) -> int:
    """Resume from the newest verified checkpoint, train to ``--steps`` or SIGTERM."""

    accelerator = Accelerator(
        cpu=True,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    # Before the model and data exist, so SIGTERM / SIGUSR1 are handled from here on.
    ckpt = CheckpointManager(
        args.checkpoint_dir,
        keep=args.keep,
        save_every=args.save_every,
        on_save=print_saved,
        save_dir=accelerator.save_state,
    )
    set_seed(args.seed)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    x, y = make_data(args.seed)
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    resume = ckpt.restore()
    if resume.resumed:
        accelerator.load_state(str(resume.path))
        print_resumed(resume.step, resume.reason, args.steps)
    else:
        out("start step=0")
    step = resume.step
    epoch = int(resume.progress.get("epoch", 0))
    index = int(resume.progress.get("index", 0))
    loss_fn = nn.MSELoss()
    model.train()
    # The boundary we start from counts too: a SIGTERM during startup stops here.
    stop = ckpt.step_done(step, final=step >= args.steps, epoch=epoch, index=index)
    while not stop:
        loader.set_epoch(epoch)
        batches: Any = skip_first_batches(loader, index) if index else loader
        for xb, yb in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            step, index = step + 1, index + 1
            if index == len(loader):
                epoch, index = epoch + 1, 0
            out(f"step={step} loss={loss.item():.6f}")
            if args.step_seconds:
                time.sleep(args.step_seconds)
            if ckpt.step_done(step, final=step >= args.steps, epoch=epoch, index=index):
                stop = True
                break
    print_end(step < args.steps, step, ckpt.skipped_step, accelerator.unwrap_model(model))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; non-zero with one ``error:`` line on stderr on failure."""
    return script_main(train, parse_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
