"""SpotTrainerCallback: transformers.Trainer's checkpoints as verified step directories.

In process: SIGUSR1 and SIGTERM (real signals, to this process, once our handlers are
checked to be the installed ones) become a ``requested`` and an ``interrupt`` save at
the next step end, the Trainer's own ``save_steps`` a ``periodic`` one and the last step
a ``final`` one; ``save_total_limit`` is applied to the step directories; the resume
helper skips a corrupt checkpoint. Two ranks (gloo): a signal on one rank is agreed by
both through one all_reduce, and the checkpoint holds both ranks' files. Under the real
supervisor: notice, fresh instance, the same final hash as a run never interrupted.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("transformers")

from integration_runs import supervised_resume
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from daemon.layout import Manifest, list_step_dirs, load_complete, read_manifest
from daemon.standins import LocalS3
from daemon.standins.emulator import MetadataEmulator
from trainer.example_hf import Sequences, make_model
from trainer.integrations.huggingface import SpotTrainerCallback, latest_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Poke(TrainerCallback):
    """Sends a real signal to this process at a given step end (before the spot callback)."""

    def __init__(self, spot: SpotTrainerCallback, at: dict[int, signal.Signals]) -> None:
        self.spot = spot
        self.at = at

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        sig = self.at.get(state.global_step)
        if sig is not None:
            # Only into our handler: a default action would end the test process.
            assert self.spot.manager.signals.active
            os.kill(os.getpid(), sig)


def _trainer(ckpt: Path, steps: int, callbacks: list[TrainerCallback]) -> Trainer:
    args = TrainingArguments(
        output_dir=str(ckpt / ".hf-output"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=5,
        save_total_limit=2,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
    return Trainer(
        model=make_model(0, 0), args=args, train_dataset=Sequences(0), callbacks=callbacks
    )


def test_signals_and_schedule_become_verified_checkpoints(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    saved: list[Manifest] = []
    spot = SpotTrainerCallback(ckpt, on_save=saved.append)
    try:
        poke = Poke(spot, {3: signal.SIGUSR1, 8: signal.SIGTERM})
        trainer = _trainer(ckpt, 12, [poke, spot])
        trainer.train(resume_from_checkpoint=latest_checkpoint(ckpt))
    finally:
        spot.manager.close()
    assert [(m.step, m.reason) for m in saved] == [
        (3, "requested"),
        (5, "periodic"),
        (8, "interrupt"),
    ]
    assert spot.stopped and trainer.state.global_step == 8
    # save_total_limit=2 applies to the step directories; none is left in output_dir.
    assert [s for s, _ in list_step_dirs(ckpt)] == [8, 5]
    assert not list((ckpt / ".hf-output").glob("checkpoint-*"))
    names = {f.path for f in load_complete(ckpt / "step-000000008").files}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= names
    assert "trainer_state.json" in names
    assert latest_checkpoint(ckpt) == str(ckpt / "step-000000008")

    saved.clear()
    spot = SpotTrainerCallback(ckpt, on_save=saved.append)
    try:
        trainer = _trainer(ckpt, 12, [spot])
        trainer.train(resume_from_checkpoint=latest_checkpoint(ckpt))
    finally:
        spot.manager.close()
    assert [(m.step, m.reason) for m in saved] == [(10, "periodic"), (12, "final")]
    assert not spot.stopped

    # A corrupt newest checkpoint is skipped by the resume helper.
    weights = ckpt / "step-000000012" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(weights, 0o644)
    weights.write_bytes(bytes(data))
    assert latest_checkpoint(ckpt) == str(ckpt / "step-000000010")


def test_refuses_settings_that_would_defeat_it(tmp_path: Path) -> None:
    spot = SpotTrainerCallback(tmp_path)
    try:
        args = SimpleNamespace(load_best_model_at_end=True)
        with pytest.raises(ValueError, match="load_best_model_at_end"):
            spot.on_init_end(args, TrainerState(), TrainerControl())  # type: ignore[arg-type]
        args = SimpleNamespace(load_best_model_at_end=False, enable_jit_checkpoint=True)
        with pytest.raises(ValueError, match="enable_jit_checkpoint"):
            spot.on_init_end(args, TrainerState(), TrainerControl())  # type: ignore[arg-type]
    finally:
        spot.manager.close()


# --- two ranks ------------------------------------------------------------------------


def _rank(rank: int, init: str, ckpt: str, results: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    out = Path(ckpt) / ".hf-output"
    spot = SpotTrainerCallback(ckpt)
    args = SimpleNamespace(output_dir=str(out), should_save=rank == 0)
    seen = []
    for step, (usr1_on, term_on) in enumerate([(1, None), (None, 0)], start=1):
        state = TrainerState(global_step=step, max_steps=10)
        control = TrainerControl()
        if rank == usr1_on:
            spot.manager.request_save()  # what the SIGUSR1 handler does
        if rank == term_on:
            spot.manager.request_stop()  # what the SIGTERM handler does
        spot.on_step_end(args, state, control)  # type: ignore[arg-type]
        seen.append((control.should_save, control.should_training_stop))
        # What the Trainer's _save_checkpoint leaves: the model from rank 0, RNG per rank.
        d = out / f"checkpoint-{step}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rng_state_{rank}.pth").write_bytes(os.urandom(64))
        if rank == 0:
            (d / "model.safetensors").write_bytes(os.urandom(256))
        spot.on_save(args, state, control)  # type: ignore[arg-type]
    results.put((rank, seen))
    dist.destroy_process_group()


def test_ranks_agree_and_one_manifest_lists_both(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    init = tmp_path / "init"
    procs = [
        ctx.Process(target=_rank, args=(r, str(init), str(tmp_path / "ckpt"), results))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    seen = dict(results.get(timeout=5) for _ in procs)
    # Step 1: SIGUSR1 on rank 1 only; step 2: SIGTERM on rank 0 only. Both ranks act on both.
    assert seen[0] == seen[1] == [(True, False), (True, True)]
    for step, reason in ((1, "requested"), (2, "interrupt")):
        d = tmp_path / "ckpt" / f"step-{step:09d}"
        m = load_complete(d)
        assert m.reason == reason and m.extra["world_size"] == 2
        assert {f.path for f in m.files} == {
            "model.safetensors",
            "rng_state_0.pth",
            "rng_state_1.pth",
        }
    assert read_manifest(tmp_path / "ckpt" / "step-000000002").reason == "interrupt"


@pytest.mark.slow
def test_resumes_exactly_under_the_supervisor(
    tmp_path: Path, s3_server: LocalS3, s3_client: Any, bucket: str, emulator: MetadataEmulator
) -> None:
    args = ["--steps", "36", "--save-every", "6", "--step-seconds", "0.2"]
    supervised_resume(
        "trainer.example_hf", args, tmp_path, s3_server.endpoint_url, s3_client, bucket, emulator
    )
