"""The reference trainer on ``transformers.Trainer``: ``python -m trainer.example_hf``.

A two-layer GPT-2 with tiny dimensions, built from its config (nothing downloaded),
learns deterministic synthetic token sequences on CPU, with :class:`SpotTrainerCallback`
turning every checkpoint the Trainer writes into a verified ``step-<9 digits>/`` under
``$SPOT_CHECKPOINT_DIR`` and resuming from the newest one. The flags and stdout lines
are those of ``python -m trainer.example`` (CONTRACT §6); interrupted and resumed on
CPU, it ends with the same ``final_params_sha256`` as a run never interrupted.

The Trainer's ``output_dir`` is ``<checkpoint dir>/.hf-output`` (same filesystem: each
checkpoint leaves it by one rename). The data order is the Trainer's own: its seedable
sampler draws each epoch's order from (seed, epoch), and on resume it skips the
batches already seen in the epoch and then restores the RNG states it saved.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from trainer.example import Ballast, flags, out, parse_framework_args, print_end, print_saved
from trainer.example_frameworks import begin, script_main
from trainer.integrations.huggingface import SpotTrainerCallback, latest_checkpoint

VOCAB = 64
SEQ = 16
N_SAMPLES = 256
BATCH = 8


class Sequences(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Arithmetic token sequences ``(a + b*t) mod VOCAB`` with noise: learnable, fixed by seed."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        a = torch.randint(0, VOCAB, (N_SAMPLES, 1), generator=g)
        b = torch.randint(1, 5, (N_SAMPLES, 1), generator=g)
        t = torch.arange(SEQ).unsqueeze(0)
        noise = (torch.rand(N_SAMPLES, SEQ, generator=g) < 0.05).long()
        self.ids = (a + b * t + noise) % VOCAB

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model(seed: int, state_mb: int) -> GPT2LMHeadModel:
    """GPT-2 from a config: 2 layers, 32 wide, dropout on (so the RNG state matters)."""
    set_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    model = GPT2LMHeadModel(config)
    if state_mb:
        # Extra state in the checkpoint (model.safetensors), to make it large.
        model.register_buffer("spot_ballast", Ballast.initial(state_mb, seed), persistent=True)
    return model


class Progress(TrainerCallback):
    """The reference trainer's ``step=N loss=F`` lines, and ``--step-seconds``."""

    def __init__(self, step_seconds: float) -> None:
        self.step_seconds = step_seconds

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        if logs and "loss" in logs:
            out(f"step={state.global_step} loss={float(logs['loss']):.6f}")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.step_seconds:
            time.sleep(self.step_seconds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags of ``python -m trainer.example`` that apply here."""
    p = flags(
        "python -m trainer.example_hf",
        __doc__,
        save_every_help="the Trainer's save_steps",
        keep_help="save_total_limit: checkpoints kept",
    )
    p.add_argument(
        "--output-dir", help="the Trainer's output_dir (default <checkpoint dir>/.hf-output)"
    )
    return parse_framework_args(p, argv)


def train(args: argparse.Namespace) -> int:
    """Resume from the newest verified checkpoint, train to ``--steps`` or SIGTERM."""

    # First, so the signal handlers are in place as early as possible.
    spot = SpotTrainerCallback(args.checkpoint_dir, on_save=print_saved)
    resume = latest_checkpoint(args.checkpoint_dir)
    model = make_model(args.seed, args.state_mb)
    if begin(Path(resume) if resume else None, args.steps, GPT2LMHeadModel.from_pretrained):
        return 0  # finished already: nothing left to train
    targs = TrainingArguments(
        output_dir=args.output_dir or str(Path(args.checkpoint_dir) / ".hf-output"),
        max_steps=args.steps,
        per_device_train_batch_size=BATCH,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        save_strategy="steps",
        save_steps=args.save_every,
        save_total_limit=args.keep,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=Sequences(args.seed),
        callbacks=[Progress(args.step_seconds), spot],
    )
    # stdout carries the reference trainer's lines only (and the supervisor's events).
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train(resume_from_checkpoint=resume)
    step = trainer.state.global_step
    print_end(spot.stopped, step, spot.manager.skipped_step, model)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; non-zero with one ``error:`` line on stderr on failure."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model from a config needs no hub
    return script_main(train, parse_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
