"""What the framework callbacks share: the manager they drive, and finding the newest checkpoint.

:class:`ManagedCallback` is the framework-free half of ``SpotTrainerCallback`` and
``SpotLightningCallback``: the :class:`trainer.CheckpointManager` each one creates (its
signal handlers installed then), ``stopped``, ``directory``. :func:`newest_checkpoint`
is the start of both ``latest_checkpoint`` helpers. What must not live here: anything
of a framework (this module imports none), or of one framework's callback alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from daemon.layout import Manifest
from trainer.checkpoint import (
    CHECKPOINT_DIR_ENV,
    CheckpointError,
    CheckpointManager,
    newest_verified,
)

if TYPE_CHECKING:  # annotations only (typing.Unpack is Python 3.11's)
    from typing_extensions import Unpack


class ManagerOptions(TypedDict, total=False):
    """The :class:`trainer.CheckpointManager` arguments a framework callback passes on as
    they are (their defaults are the manager's)."""

    on_save: Callable[[Manifest], None] | None
    notice_file: str | os.PathLike[str] | None
    deadline_margin: float


class ManagedCallback:
    """The manager a framework callback drives at the framework's step boundaries.

    Created with the callback, so the SIGTERM / SIGUSR1 handlers are installed then (main
    thread only). The framework writes each checkpoint itself, in its loop: the manager
    only commits the directory written (no background save).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        run_id: str | None,
        *,
        keep: int | None,
        save_every: int | None = None,
        **options: Unpack[ManagerOptions],
    ) -> None:
        self.manager = CheckpointManager(
            directory, run_id, keep=keep, save_every=save_every, async_save=False, **options
        )
        self.stopped = False
        """SIGTERM ended training (its state saved, unless the deadline left no time)."""

    @property
    def directory(self) -> Path:
        """Where the step directories are (``$SPOT_CHECKPOINT_DIR`` by default)."""
        return self.manager.directory


def newest_checkpoint(directory: str | os.PathLike[str] | None) -> tuple[Path, Manifest] | None:
    """The newest checkpoint in ``directory`` (default ``$SPOT_CHECKPOINT_DIR``) whose
    manifest validates and every file matches its sha256 (corrupt ones are skipped with a
    warning); None when there is none."""
    where = directory if directory is not None else os.environ.get(CHECKPOINT_DIR_ENV)
    if not where:
        raise CheckpointError(f"no checkpoint directory: pass one or set ${CHECKPOINT_DIR_ENV}")
    return newest_verified(where)
