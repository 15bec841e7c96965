"""The training library: atomic, verified, signal-aware checkpoints inside a PyTorch process.

    from trainer import CheckpointManager

    ckpt = CheckpointManager(save_every=100)          # $SPOT_CHECKPOINT_DIR, $SPOT_RUN_ID
    resume = ckpt.restore(model, optimizer, scheduler)
    step = resume.step
    while not ckpt.step_done(step, final=step == total_steps):
        train_one_step()
        step += 1

Periodic saves are written in a background thread (the loop waits only for a copy of
the state into CPU memory); large values are split into files of at most ~1 GB; under
``torch.distributed`` the ranks agree on every stop and save, and on several nodes each
node writes its own part of every checkpoint into its own ``$SPOT_CHECKPOINT_DIR``
(:mod:`trainer.nodes`); sharded state (FSDP2, DTensor) is saved through
``torch.distributed.checkpoint`` (:meth:`CheckpointManager.track_sharded`,
:mod:`trainer.sharded`). Imports torch, never boto3: uploading is the supervisor's job
(``daemon``).
"""

from daemon.layout import Manifest, ManifestError
from trainer.checkpoint import (
    DEFAULT_SHARD_BYTES,
    Boundary,
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    Resume,
    Stateful,
    newest_verified,
)
from trainer.rng import capture_rng, restore_rng
from trainer.signals import Notice, SignalFlags, notice_deadline, read_notice

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "Boundary",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "Manifest",
    "ManifestError",
    "Notice",
    "Resume",
    "SignalFlags",
    "Stateful",
    "capture_rng",
    "newest_verified",
    "notice_deadline",
    "read_notice",
    "restore_rng",
]
