"""Spot checkpoints for ``transformers.Trainer``: one callback, one resume helper.

    from trainer.integrations.huggingface import SpotTrainerCallback, latest_checkpoint

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[SpotTrainerCallback()])
    trainer.train(resume_from_checkpoint=latest_checkpoint())

At each step end (after the optimizer step) the callback looks at SIGTERM / SIGUSR1
(its handlers are installed when it is created) and, under ``torch.distributed``, makes
the ranks agree with one small all_reduce (:meth:`CheckpointManager.decide`). SIGUSR1
sets ``control.should_save``; SIGTERM sets it and ``control.should_training_stop``; the
last step always saves. Each checkpoint the Trainer then writes (``checkpoint-N`` in
``args.output_dir``), for these reasons or its own ``save_steps``, is moved by one
rename into ``$SPOT_CHECKPOINT_DIR`` as ``step-<9 digits>/`` with a manifest of
sha256s (CONTRACT §4), reason ``periodic``, ``requested``, ``interrupt`` or
``final``. ``args.output_dir`` must therefore be on the checkpoint directory's
filesystem (checked when training begins).

Retention: since every ``checkpoint-N`` leaves ``output_dir`` as soon as it is written,
the Trainer's own rotation never finds one to delete; the callback prunes the step
directories instead, keeping ``args.save_total_limit`` of them (None keeps all, as the
Trainer would), unless ``keep=`` says otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from daemon.layout import step_dir_name
from trainer.checkpoint import Boundary, CheckpointError
from trainer.integrations.common import ManagedCallback, ManagerOptions, newest_checkpoint

if TYPE_CHECKING:  # annotations only (typing.Unpack is Python 3.11's)
    from typing_extensions import Unpack

log = logging.getLogger("trainer.integrations.huggingface")

FROM_ARGS: Any = "from-args"
"""``keep=`` default: follow ``args.save_total_limit``."""


def latest_checkpoint(directory: str | os.PathLike[str] | None = None) -> str | None:
    """What to pass as ``trainer.train(resume_from_checkpoint=...)``.

    The newest checkpoint in ``directory`` (default ``$SPOT_CHECKPOINT_DIR``) whose
    manifest validates and every file matches its sha256; None when there is none.
    Corrupt or incomplete ones are skipped with a warning.
    """
    found = newest_checkpoint(directory)
    return str(found[0]) if found is not None else None


def _output_dir(args: TrainingArguments) -> Path:
    if not args.output_dir:
        raise CheckpointError("TrainingArguments.output_dir is not set")
    return Path(args.output_dir)


class SpotTrainerCallback(ManagedCallback, TrainerCallback):
    """Carries SIGTERM / SIGUSR1 into verified checkpoints of a ``transformers.Trainer``.

    Create it early (it installs the signal handlers, main thread only) and pass it in
    ``callbacks=``. Args are those of :class:`trainer.CheckpointManager`, and ``keep``
    (default: ``args.save_total_limit``). After ``trainer.train()`` returns,
    :attr:`stopped` says whether SIGTERM ended it (then exit 0: the supervisor
    restarts the run from the interrupt checkpoint).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        *,
        keep: int | None = FROM_ARGS,
        **options: Unpack[ManagerOptions],
    ) -> None:
        super().__init__(directory, run_id, keep=None if keep is FROM_ARGS else keep, **options)
        self._keep = keep
        self._pending: Boundary | None = None
        self._began: float | None = None

    # -- checks --------------------------------------------------------------------

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if args.load_best_model_at_end:
            raise ValueError(
                "SpotTrainerCallback moves each checkpoint out of output_dir, so the Trainer "
                "cannot find its best one at the end: set load_best_model_at_end=False"
            )
        if getattr(args, "enable_jit_checkpoint", False):
            raise ValueError(
                "enable_jit_checkpoint installs its own SIGTERM handler, which saves in the "
                "middle of a step: turn it off, SpotTrainerCallback handles SIGTERM"
            )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._keep is FROM_ARGS:
            self.manager.keep = args.save_total_limit
        elif args.save_total_limit is not None and args.save_total_limit != self._keep:
            log.info(
                "keeping %s checkpoints in %s (keep=), not save_total_limit=%s",
                self._keep,
                self.directory,
                args.save_total_limit,
            )
        out = _output_dir(args)
        if args.should_save:
            out.mkdir(parents=True, exist_ok=True)
            if out.stat().st_dev != self.directory.stat().st_dev:
                raise CheckpointError(
                    f"output_dir {out} is not on the filesystem of {self.directory}: each "
                    "checkpoint is moved there by a rename, never copied; put output_dir "
                    f"on that filesystem (for example {self.directory / '.hf-output'})"
                )
        # Resumed from one of ours: that step is saved (a SIGTERM now writes nothing new).
        step = state.global_step
        if step and (self.directory / step_dir_name(step)).is_dir():
            self.manager.mark_saved(step)
        if self.manager.signals.reclaim():
            log.warning("something replaced the SIGTERM/SIGUSR1 handlers; ours are back")

    # -- the step boundary ---------------------------------------------------------

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> TrainerControl:
        step = state.global_step
        final = step >= state.max_steps
        # control.should_save here is the Trainer's own schedule (DefaultFlowCallback ran).
        boundary = self.manager.decide(step, final=final, periodic=bool(control.should_save))
        if boundary.save:
            control.should_save = True
            self._pending = boundary
            self._began = time.monotonic()
        elif boundary.skip:
            control.should_save = False  # too close to the kill to write anything
        if boundary.stop and not final:
            control.should_training_stop = True
            self.stopped = True
        return control

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> TrainerControl:
        # Training is ending with this step unsaved (an evaluation under save_strategy
        # "best" cancelled the save, or early stopping): save it now, the Trainer does
        # after on_epoch_end. A run must end on a final (or interrupt) checkpoint.
        step = state.global_step
        if (
            control.should_training_stop
            and step > 0
            and self.manager.latest_step != step
            and self.manager.skipped_step != step
        ):
            control.should_save = True
            if self._pending is None or self._pending.step != step:
                reason = "interrupt" if self.stopped else "final"
                self._pending = Boundary(step, reason, self.stopped, False)
                self._began = time.monotonic()
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> TrainerControl:
        step = state.global_step
        pending, self._pending = self._pending, None
        if pending is not None and pending.step == step and pending.reason is not None:
            reason = pending.reason
            began = self._began
        else:  # the Trainer's own save (save_strategy "epoch", a subclass...)
            reason = "interrupt" if self.stopped else "periodic"
            began = None
        if reason in ("periodic", "requested") and (
            step >= state.max_steps or (control.should_training_stop and not self.stopped)
        ):
            reason = "final"  # early stopping decided after on_step_end: this is the last save
        source = _output_dir(args) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if args.should_save and not source.is_dir():
            raise CheckpointError(
                f"the Trainer saved step {step} but {source} is not there (a hyperparameter "
                "search or a custom _save_checkpoint writes elsewhere)"
            )
        self.manager.save_directory(step, reason, source=source, began=began)
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.manager.wait()
        if self.stopped:
            log.info("training stopped at step %d by SIGTERM", state.global_step)
