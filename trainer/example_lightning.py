"""The reference trainer on Lightning's ``Trainer``: ``python -m trainer.example_lightning``.

The model and data of ``python -m trainer.example`` (an MLP with dropout on a
deterministic synthetic regression, AdamW, cosine LR stepped per optimizer step) as a
``LightningModule``, with :class:`SpotLightningCallback` saving verified checkpoints
under ``$SPOT_CHECKPOINT_DIR`` and resuming from the newest one. Same flags and stdout
lines as ``python -m trainer.example`` (CONTRACT §6); on CPU, interrupted and resumed,
it ends with the same ``final_params_sha256`` as a run never interrupted.

What makes the resume exact besides the callback (which keeps the RNG states): the
data comes from a :class:`ResumableDataLoader` over a :class:`ResumableSampler`, so
each epoch's order depends on (seed, epoch) only and an interrupted epoch continues
after the batches already trained. ``--plain-loader`` uses ``DataLoader(shuffle=True)``
instead, to show what Lightning does with one (tests/test_integrations_lightning.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from daemon.layout import Manifest, read_manifest
from trainer.checkpoint import CHECKPOINT_DIR_ENV, CheckpointError
from trainer.example import BATCH, Ballast, make_data, make_model, out, params_sha256
from trainer.integrations.lightning import (
    ResumableDataLoader,
    ResumableSampler,
    SpotLightningCallback,
    latest_checkpoint,
)


class Regression(pl.LightningModule):
    """trainer.example's MLP, optimizer and schedule as a LightningModule."""

    def __init__(self, steps: int, lr: float, state_mb: int, seed: int) -> None:
        super().__init__()
        self.net = make_model()
        self.steps = steps
        self.lr = lr
        self.loss_fn = nn.MSELoss()
        if state_mb:
            self.register_buffer("ballast", Ballast.initial(state_mb, seed), persistent=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return self.loss_fn(self.net(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.steps, 1))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class Progress(pl.Callback):
    """The reference trainer's ``step=N loss=F`` lines, and ``--step-seconds``."""

    def __init__(self, step_seconds: float) -> None:
        self.step_seconds = step_seconds

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        out(f"step={trainer.global_step} loss={float(loss):.6f}")
        if self.step_seconds:
            time.sleep(self.step_seconds)


def make_loader(seed: int, plain: bool) -> DataLoader[Any]:
    """The training data: resumable mid-epoch, or (``plain``) a shuffled DataLoader."""
    x, y = make_data(seed)
    dataset = TensorDataset(x, y)
    if plain:
        return DataLoader(dataset, batch_size=BATCH, shuffle=True)
    sampler = ResumableSampler(dataset, seed=seed)
    return ResumableDataLoader(dataset, batch_size=BATCH, sampler=sampler, seed=seed)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags of ``python -m trainer.example`` that apply here."""
    p = argparse.ArgumentParser(prog="python -m trainer.example_lightning", description=__doc__)
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps (default 200)")
    p.add_argument("--save-every", type=int, default=20, help="periodic checkpoint interval")
    p.add_argument("--step-seconds", type=float, default=0.0, help="sleep added to each step")
    p.add_argument("--state-mb", type=int, default=0, help="extra MiB of state per checkpoint")
    p.add_argument("--seed", type=int, default=0, help="data, model and RNG seed")
    p.add_argument("--keep", type=int, default=3, help="complete checkpoints kept locally")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--plain-loader", action="store_true", help="DataLoader(shuffle=True)")
    p.add_argument(
        "--checkpoint-dir",
        default=os.environ.get(CHECKPOINT_DIR_ENV),
        help=f"default ${CHECKPOINT_DIR_ENV}",
    )
    args = p.parse_args(argv)
    if args.checkpoint_dir is None:
        p.error(f"no checkpoint directory: set ${CHECKPOINT_DIR_ENV} or pass --checkpoint-dir")
    if args.steps < 1 or args.save_every < 1 or args.keep < 1:
        p.error("--steps, --save-every and --keep must be at least 1")
    if args.step_seconds < 0 or args.state_mb < 0:
        p.error("--step-seconds and --state-mb must not be negative")
    return args


def train(args: argparse.Namespace) -> int:
    """Resume from the newest verified checkpoint, train to ``--steps`` or SIGTERM."""

    def saved(m: Manifest) -> None:
        out(f"checkpoint_saved step={m.step} reason={m.reason} bytes={m.total_bytes}")

    # First, so the signal handlers are in place as early as possible.
    spot = SpotLightningCallback(
        args.checkpoint_dir, save_every=args.save_every, keep=args.keep, on_save=saved
    )
    resume = latest_checkpoint(args.checkpoint_dir)
    pl.seed_everything(args.seed, verbose=False)
    module = Regression(args.steps, args.lr, args.state_mb, args.seed)
    if resume is not None:
        manifest = read_manifest(Path(resume).parent)
        out(f"resumed step={manifest.step} reason={manifest.reason}")
        if manifest.step > args.steps:
            raise CheckpointError(f"checkpoint step {manifest.step} is beyond --steps {args.steps}")
        if manifest.step == args.steps:  # finished already: nothing left to train
            ckpt = torch.load(resume, map_location="cpu", weights_only=True)
            module.load_state_dict(ckpt["state_dict"])
            out(f"final_params_sha256={params_sha256(module)}")
            return 0
    else:
        out("start step=0")
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Progress(args.step_seconds), spot],
    )
    trainer.fit(
        module, train_dataloaders=make_loader(args.seed, args.plain_loader), ckpt_path=resume
    )
    step = trainer.global_step
    if spot.stopped:
        if spot.manager.skipped_step == step:
            out(f"save_skipped step={step} reason=deadline")
        out(f"stopped step={step}")
    else:
        out(f"final_params_sha256={params_sha256(module)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; non-zero with one ``error:`` line on stderr on failure."""
    logging.basicConfig(
        level=os.environ.get("TRAINER_LOG_LEVEL", "INFO"),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Lightning suggests more loader workers; on a toy dataset one process is right.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    args = parse_args(argv)
    try:
        return train(args)
    except (CheckpointError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
