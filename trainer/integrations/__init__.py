"""Drop-ins for training loops the manager does not drive: one module per framework.

* :mod:`trainer.integrations.huggingface`: ``SpotTrainerCallback`` for
  ``transformers.Trainer``;
* :mod:`trainer.integrations.lightning`: ``SpotLightningCallback`` for Lightning's
  ``Trainer``;
* Accelerate needs no module: :class:`trainer.CheckpointManager` with
  ``save_dir=accelerator.save_state`` (the recipe is in ``python -m
  trainer.example_accelerate``);
* :mod:`trainer.integrations.data`: a sampler and a data loader whose order depends on
  (seed, epoch) only and that resume mid-epoch (torch only).
* :mod:`trainer.integrations.common`: what the callbacks share (the manager they drive,
  finding the newest checkpoint), no framework.

Importing this package imports no framework: each module imports its own when it is
imported (they come with the ``integrations`` extra), and the supervisor imports none.

What must not live here: anything a framework's loop does not need. Each module builds
on the public :class:`trainer.CheckpointManager` (``decide``, ``save_directory``,
``restore``), never on its private parts; like all of ``trainer`` it imports torch, never
boto3 or a cloud SDK, and nothing of ``daemon`` but :mod:`daemon.layout`, the on-disk
contract.
"""
