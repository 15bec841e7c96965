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
:mod:`trainer.sharded`).

What lives where (the public names are importable from ``trainer`` and, as before the
manager was split, from ``trainer.checkpoint``):

* :mod:`trainer.checkpoint`: :class:`CheckpointManager`, the training loop's half
  (signal handlers, ``step_done``, ``decide``); its base class is
* :mod:`trainer.store`: ``CheckpointStore``, saving and loading (``save``,
  ``save_async``, ``save_directory``, ``wait``, ``restore``, ``load_latest``, ``prune``);
  it hands each job to one of:
* :mod:`trainer.schedule`: the decision at a step boundary (save? why? stop? is the
  notice deadline too close?);
* :mod:`trainer.writer`: writing one checkpoint, and the one save in flight in the
  background; :mod:`trainer.snapshot`: the copy of the state into CPU memory for it;
  :mod:`trainer.shards`: a large value split into files of at most ``shard_bytes``;
* :mod:`trainer.staging`: committing a directory another library wrote, without a copy;
* :mod:`trainer.loading`: the newest checkpoint that verifies and loads, and putting it
  back into the tracked objects;
* :mod:`trainer.localdir`: which checkpoints in ``local_dir`` are good; pruning, setting
  aside, sweeping directories a dead writer left;
* :mod:`trainer.distributed` (the ranks, their nodes, two gloo groups),
  :mod:`trainer.nodes` (the per-node save protocol), :mod:`trainer.sharded` (FSDP2 /
  DTensor through DCP);
* :mod:`trainer.state` (names, the values a checkpoint may hold, ``Checkpoint``,
  ``Resume``), :mod:`trainer.errors` (``CheckpointError``), :mod:`trainer.signals`
  (SIGTERM / SIGUSR1, the supervisor's notice), :mod:`trainer.rng` (RNG states);
* :mod:`trainer.integrations`: drop-ins for ``transformers.Trainer`` and Lightning;
* ``trainer.example*``: reference scripts (``python -m trainer.example``, CONTRACT §6).

What must not live here: this package runs inside the training process and imports
torch, never boto3 or any cloud SDK (uploading is the supervisor's job, ``daemon``), and
nothing of ``daemon`` but :mod:`daemon.layout`, the on-disk contract both sides share.
Frameworks (transformers, Lightning, Accelerate) are imported only by the modules made
for them (:mod:`trainer.integrations`, ``trainer.example_hf`` ...).
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
