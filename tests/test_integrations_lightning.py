"""SpotLightningCallback: Lightning's Trainer, our SIGTERM, verified checkpoints.

Lightning's own SIGTERM handling (its _SignalConnector: forward the signal to the ranks
it launched, then raise SIGTERMException after the step, without a save) would race
ours. The callback switches its registration off: during ``fit`` our handlers are the
installed ones, a real SIGTERM becomes an ``interrupt`` checkpoint and a clean return
from ``fit`` (Lightning never sees it), a SIGUSR1 a ``requested`` one; a plain Trainer,
for contrast, does install its handler. With a plain ``DataLoader(shuffle=True)`` a
mid-epoch resume is not exact; the test bounds the difference: only the rest of the
interrupted epoch sees other samples. Under the real supervisor the reference script
(ResumableDataLoader) ends with the hash of a run never interrupted.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from integration_runs import supervised_resume

from daemon.layout import Manifest, list_step_dirs, load_complete
from daemon.standins import LocalS3
from daemon.standins.emulator import MetadataEmulator
from trainer.example import make_data, params_sha256
from trainer.example_lightning import Regression, make_loader, make_trainer
from trainer.integrations.lightning import (
    CHECKPOINT_NAME,
    SpotLightningCallback,
    latest_checkpoint,
)

STEPS_PER_EPOCH = 16  # trainer.example: 512 samples, batches of 32


class Probe(pl.Callback):
    """Records each step's samples and the SIGTERM handler; acts at given steps.

    Placed before the spot callback, so what it does at a step end is seen there.
    """

    def __init__(self, spot: SpotLightningCallback | None, act: dict[int, Any]) -> None:
        self.spot = spot
        self.act = act
        x, _ = make_data(0)
        self.index = {row.numpy().tobytes(): i for i, row in enumerate(x)}
        self.samples: dict[int, list[int]] = {}
        self.handlers: list[Any] = []
        self.received_sigterm: list[bool] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step + 1
        self.samples[step] = [self.index[row.numpy().tobytes()] for row in batch[0]]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *a: Any
    ) -> None:
        self.handlers.append(signal.getsignal(signal.SIGTERM))
        action = self.act.get(trainer.global_step)
        if isinstance(action, signal.Signals):
            # Only into our handler: a default action would end the test process.
            assert self.spot is not None and self.spot.manager.signals.active
            os.kill(os.getpid(), action)
        elif action == "stop":
            assert self.spot is not None
            self.spot.manager.request_stop()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received_sigterm.append(trainer.received_sigterm)


def full_loss(module: Regression) -> float:
    """MSE over all 512 samples, dropout off."""
    x, y = make_data(0)
    module.eval()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(module.net(x), y))


def _fit(
    ckpt: Path,
    steps: int,
    act: dict[int, Any],
    *,
    plain: bool,
    spot: bool = True,
    saved: list[Manifest] | None = None,
) -> tuple[Probe, pl.Trainer, SpotLightningCallback | None, Regression]:
    on_save = saved.append if saved is not None else None
    cb = SpotLightningCallback(ckpt, save_every=10, on_save=on_save) if spot else None
    probe = Probe(cb, act)
    resume = latest_checkpoint(ckpt) if cb is not None else None
    pl.seed_everything(0, verbose=False)
    module = Regression(steps, 3e-3, 0, 0)
    trainer = make_trainer(steps, [probe, cb] if cb is not None else [probe])
    try:
        trainer.fit(module, train_dataloaders=make_loader(0, plain), ckpt_path=resume)
    finally:
        if cb is not None:
            cb.manager.close()
    return probe, trainer, cb, module


def test_our_sigterm_not_lightnings(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    saved: list[Manifest] = []
    probe, trainer, spot, _ = _fit(
        ckpt, 12, {3: signal.SIGUSR1, 5: signal.SIGTERM}, plain=False, saved=saved
    )
    assert spot is not None
    # During fit the SIGTERM handler is ours; Lightning's connector registered nothing.
    assert {h == spot.manager.signals._on_term for h in probe.handlers} == {True}
    assert trainer._signal_connector._original_handlers == {}
    assert probe.received_sigterm == [False]  # Lightning never saw the signal
    assert [(m.step, m.reason) for m in saved] == [(3, "requested"), (5, "interrupt")]
    assert spot.stopped and trainer.global_step == 5
    assert trainer.state.status == "finished"  # a clean return, no SIGTERMException
    m = load_complete(ckpt / "step-000000005")
    assert {f.path for f in m.files} == {CHECKPOINT_NAME}
    assert latest_checkpoint(ckpt) == str(ckpt / "step-000000005" / CHECKPOINT_NAME)

    # Resumed: periodic at 10, final at 12.
    saved.clear()
    _fit(ckpt, 12, {}, plain=False, saved=saved)
    assert [(m.step, m.reason) for m in saved] == [(10, "periodic"), (12, "final")]
    assert [s for s, _ in list_step_dirs(ckpt)] == [12, 10, 5]

    # For contrast: a Trainer without the callback installs Lightning's handler.
    plain_probe, _, _, _ = _fit(tmp_path / "plain", 2, {}, plain=False, spot=False)
    assert type(plain_probe.handlers[0]).__name__ == "_HandlersCompose"


def test_plain_dataloader_resume_differs_only_in_the_interrupted_epoch(tmp_path: Path) -> None:
    """What Lightning does with a loader that has no state_dict: the interrupted epoch
    starts over in a new order, for as many batches as it had left. Our RNG restore keeps
    every later epoch (its order, its dropout) as in the uninterrupted run; the
    parameters still differ. With ResumableDataLoader everything is the same."""
    steps, stop_at = STEPS_PER_EPOCH + 4, 5
    runs, losses = {}, {}
    for plain in (True, False):
        ref, _, _, ref_module = _fit(tmp_path / f"ref-{plain}", steps, {}, plain=plain)
        ckpt = tmp_path / f"interrupted-{plain}"
        first, trainer, _, _ = _fit(ckpt, steps, {stop_at: "stop"}, plain=plain)
        assert trainer.global_step == stop_at
        second, trainer, _, module = _fit(ckpt, steps, {}, plain=plain)
        assert trainer.global_step == steps
        resumed = {**first.samples, **second.samples}
        runs[plain] = (ref.samples, resumed, params_sha256(ref_module), params_sha256(module))
        losses[plain] = (full_loss(ref_module), full_loss(module))

    ref_samples, resumed, ref_hash, hash_ = runs[False]
    assert resumed == ref_samples and hash_ == ref_hash  # ResumableDataLoader: exact

    ref_samples, resumed, ref_hash, hash_ = runs[True]
    assert sorted(resumed) == sorted(ref_samples) == list(range(1, steps + 1))
    differing = [s for s in resumed if resumed[s] != ref_samples[s]]
    # Only the rest of the interrupted epoch (steps 6..16) sees other samples ...
    assert differing and set(differing) <= set(range(stop_at + 1, STEPS_PER_EPOCH + 1))
    # ... and what it sees is the start of a new order: some samples twice, some never.
    epoch0 = [i for s in range(1, STEPS_PER_EPOCH + 1) for i in resumed[s]]
    assert len(set(epoch0)) < len(epoch0)
    assert hash_ != ref_hash
    # Bounded in effect too: the loss over the whole data set ends within 5 %.
    ref_loss, loss = losses[True]
    print(f"plain loader: final loss {loss:.6f}, uninterrupted {ref_loss:.6f}")
    assert abs(loss - ref_loss) <= 0.05 * ref_loss


@pytest.mark.slow
def test_resumes_exactly_under_the_supervisor(
    tmp_path: Path, s3_server: LocalS3, s3_client: Any, bucket: str, emulator: MetadataEmulator
) -> None:
    args = ["--steps", "36", "--save-every", "6", "--step-seconds", "0.2"]
    runs = supervised_resume(
        "trainer.example_lightning",
        args,
        tmp_path,
        s3_server.endpoint_url,
        s3_client,
        bucket,
        emulator,
    )
    # Lightning's SIGTERM path never ran: no "Received SIGTERM", no SIGTERMException.
    out = "\n".join(runs["boot1"].lines)
    assert "Received SIGTERM" not in out and "SIGTERMException" not in out
