"""Spot checkpoints for Lightning's ``Trainer``: one callback, one resume helper.

    from trainer.integrations.lightning import SpotLightningCallback, latest_checkpoint

    trainer = L.Trainer(..., callbacks=[SpotLightningCallback(save_every=500)])
    trainer.fit(model, datamodule=dm, ckpt_path=latest_checkpoint())

At each optimizer-step boundary (``on_train_batch_end``) the callback looks at SIGTERM
and SIGUSR1 and, under ``torch.distributed``, makes the ranks agree with one small
all_reduce (:meth:`CheckpointManager.decide`). When a save is due (``periodic`` every
``save_every`` steps, ``requested`` after SIGUSR1, ``interrupt`` after SIGTERM,
``final`` after the last step) it calls ``trainer.save_checkpoint`` into a staging
directory, and commits that as ``step-<9 digits>/model.ckpt`` with a manifest
(CONTRACT §4). After SIGTERM it stops the Trainer at once (no validation first, and
``min_steps`` / ``min_epochs`` do not hold it).

Lightning's own SIGTERM handling is switched off for the Trainer the callback is in:
its ``_SignalConnector`` would install a handler, when ``fit`` starts, that forwards
SIGTERM to the ranks it launched, broadcasts the stop and raises ``SIGTERMException``
(exit without a save) after the step: a race with the save we want. The callback
disables that registration in ``setup`` and, in ``on_train_start``, checks that its
own handlers are the installed ones (putting them back if something replaced them).
Lightning's SLURM auto-requeue on SIGUSR1 goes with it.

What Lightning does not keep, the callback does: the RNG states (Python, NumPy, torch,
CUDA) go into the checkpoint as the callback's state and are put back just before the
first step after a resume. For the data, see :mod:`trainer.integrations.data`
(``ResumableDataLoader``): with a plain ``DataLoader(shuffle=True)`` Lightning starts an
interrupted epoch over, in a new order.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from daemon.layout import step_dir_name
from trainer.checkpoint import CheckpointError
from trainer.integrations.common import ManagedCallback, ManagerOptions, newest_checkpoint
from trainer.integrations.data import ResumableDataLoader, ResumableSampler
from trainer.rng import capture_rng, restore_rng

if TYPE_CHECKING:  # annotations only (typing.Unpack is Python 3.11's)
    from typing_extensions import Unpack

__all__ = [
    "CHECKPOINT_NAME",
    "ResumableDataLoader",
    "ResumableSampler",
    "SpotLightningCallback",
    "latest_checkpoint",
]

log = logging.getLogger("trainer.integrations.lightning")

CHECKPOINT_NAME = "model.ckpt"
"""The file ``trainer.save_checkpoint`` writes in each step directory."""


def latest_checkpoint(directory: str | os.PathLike[str] | None = None) -> str | None:
    """What to pass as ``trainer.fit(..., ckpt_path=...)``.

    The ``model.ckpt`` of the newest checkpoint in ``directory`` (default
    ``$SPOT_CHECKPOINT_DIR``) whose manifest validates and every file matches its
    sha256; None when there is none (corrupt ones are skipped with a warning).
    """
    found = newest_checkpoint(directory)
    if found is None:
        return None
    path, manifest = found
    if not any(f.path == CHECKPOINT_NAME for f in manifest.files):
        raise CheckpointError(f"{path} has no {CHECKPOINT_NAME}: not written by Lightning")
    return str(path / CHECKPOINT_NAME)


def _no_signal_handlers() -> None:
    """Stands in for ``_SignalConnector.register_signal_handlers``: SIGTERM is ours."""


class SpotLightningCallback(ManagedCallback, pl.Callback):
    """Carries SIGTERM / SIGUSR1 into verified checkpoints of a Lightning ``Trainer``.

    Create it early (it installs the signal handlers, main thread only). ``save_every``
    (optimizer steps, None for no periodic saves) and the other arguments are those of
    :class:`trainer.CheckpointManager`. After ``trainer.fit()`` returns, :attr:`stopped`
    says whether SIGTERM ended it (then exit 0: the supervisor restarts the run).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        *,
        save_every: int | None = None,
        keep: int | None = 3,
        **options: Unpack[ManagerOptions],
    ) -> None:
        super().__init__(directory, run_id, keep=keep, save_every=save_every, **options)
        self._boundary = -1
        self._rng_to_restore: dict[str, Any] | None = None

    # -- signals -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and hasattr(connector, "register_signal_handlers"):
            connector.register_signal_handlers = _no_signal_handlers
        else:
            log.warning("Lightning's signal connector not found; taking SIGTERM back at start")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.manager.signals.reclaim():
            log.warning("something replaced the SIGTERM/SIGUSR1 handlers; ours are back")
        connector = getattr(trainer, "_signal_connector", None)
        if getattr(connector, "received_sigterm", False):
            connector.received_sigterm = False  # type: ignore[union-attr]  # ours saw it too
        step = trainer.global_step
        self._boundary = step
        if step and (self.directory / step_dir_name(step)).is_dir():
            self.manager.mark_saved(step)  # resumed from it: a SIGTERM now writes nothing

    # -- state Lightning does not keep ---------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Here, not at load time: setting up the run (sanity checks, data loaders) draws
        # from the RNG; the state saved after step N is the one step N+1 must start from.
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None

    # -- the step boundary ---------------------------------------------------------

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._boundary:
            return  # accumulating gradients: no optimizer step, no boundary
        self._boundary = step
        final = self._is_final(trainer)
        boundary = self.manager.decide(step, final=final)
        if boundary.save and boundary.reason is not None:
            self._save(trainer, step, boundary.reason)
        if boundary.stop and not final:
            self.stopped = True
            self._stop_now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training ended without the last step being known as such at its end (early
        # stopping, max_time): that state is the final one.
        step = trainer.global_step
        if not self.stopped and self.manager.latest_step != step:
            self._save(trainer, step, "final")
        elif not self.stopped:
            latest = self.directory / step_dir_name(step)
            reason = _reason_of(latest)
            if reason not in (None, "final"):
                log.warning(
                    "training ended at step %d, already saved as %s: no final checkpoint, so "
                    "the supervisor will start the run again",
                    step,
                    reason,
                )

    def _save(self, trainer: pl.Trainer, step: int, reason: str) -> None:
        def fill(staging: Path) -> None:
            trainer.save_checkpoint(staging / CHECKPOINT_NAME, weights_only=False)

        self.manager.save_directory(step, reason, fill=fill)

    @staticmethod
    def _is_final(trainer: pl.Trainer) -> bool:
        max_steps = trainer.max_steps
        if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
            return True
        max_epochs = trainer.max_epochs
        return bool(
            max_epochs is not None
            and max_epochs >= 0
            and trainer.current_epoch + 1 >= max_epochs
            and trainer.is_last_batch
        )

    @staticmethod
    def _stop_now(trainer: pl.Trainer) -> None:
        """End ``fit`` after this batch: no validation first, whatever min_steps/min_epochs say."""
        trainer.should_stop = True
        loop = trainer.fit_loop
        loop.min_epochs = None
        loop.epoch_loop.min_steps = None
        if hasattr(loop.epoch_loop, "_skip_next_val"):
            loop.epoch_loop._skip_next_val = True


def _reason_of(path: Path) -> str | None:
    try:
        from daemon.layout import read_manifest

        return read_manifest(path).reason
    except (OSError, ValueError):
        return None
