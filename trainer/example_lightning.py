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
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer.example import (
    BATCH,
    Ballast,
    flags,
    make_data,
    make_model,
    out,
    parse_framework_args,
    print_end,
    print_saved,
)
from trainer.example_frameworks import begin, script_main
from trainer.integrations.lightning import (
    CHECKPOINT_NAME,
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
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *a: Any
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


def make_trainer(steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """Lightning's ``Trainer`` as this script runs it: ``steps`` optimizer steps on one
    CPU, nothing of its own on stdout (no logger, progress bar or summary) and no
    checkpointing of its own (``callbacks`` save)."""
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags of ``python -m trainer.example`` that apply here."""
    p = flags("python -m trainer.example_lightning", __doc__)
    p.add_argument("--plain-loader", action="store_true", help="DataLoader(shuffle=True)")
    return parse_framework_args(p, argv)


def train(args: argparse.Namespace) -> int:
    """Resume from the newest verified checkpoint, train to ``--steps`` or SIGTERM."""

    # First, so the signal handlers are in place as early as possible.
    spot = SpotLightningCallback(
        args.checkpoint_dir, save_every=args.save_every, keep=args.keep, on_save=print_saved
    )
    resume = latest_checkpoint(args.checkpoint_dir)
    pl.seed_everything(args.seed, verbose=False)
    module = Regression(args.steps, args.lr, args.state_mb, args.seed)

    def load_final(step_dir: Path) -> nn.Module:
        ckpt = torch.load(step_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
        module.load_state_dict(ckpt["state_dict"])
        return module

    if begin(Path(resume).parent if resume else None, args.steps, load_final):
        return 0  # finished already: nothing left to train
    trainer = make_trainer(args.steps, [Progress(args.step_seconds), spot])
    trainer.fit(
        module, train_dataloaders=make_loader(args.seed, args.plain_loader), ckpt_path=resume
    )
    step = trainer.global_step
    print_end(spot.stopped, step, spot.manager.skipped_step, module)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; non-zero with one ``error:`` line on stderr on failure."""
    # Lightning suggests more loader workers; on a toy dataset one process is right.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    return script_main(train, parse_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
