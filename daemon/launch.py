"""Starting the training command: its user, its environment, its process.

Each start hands the trainer what CONTRACT §2 promises (``SPOT_CHECKPOINT_DIR``,
``SPOT_RUN_ID``, ``SPOT_NOTICE_FILE``; several nodes: the rendezvous of this
incarnation) on top of the supervisor's environment and ``run.env``, as ``run.user``
when one is set, and removes the notice file an earlier drain may have left. What must
not live here: when to start it (:mod:`daemon.exits`, :mod:`daemon.policy`), and the
process tree itself (:mod:`daemon.child`).
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from daemon.child import TrainerProcess, child_environment
from daemon.config import Config
from daemon.nodes import MultiNode

log = structlog.get_logger(__name__)


def start_trainer(cfg: Config, nodes: MultiNode | None) -> TrainerProcess | None:
    """The training command, started (None: it could not be; the error is logged)."""
    from daemon.runas import prepare_for

    _remove_quietly(cfg.notice_file)
    try:
        # run.user: the child's identity, and local_dir handed to it (None: as we run).
        run_as = prepare_for(cfg)
    except (OSError, LookupError) as exc:
        log.error("child_start_failed", argv=list(cfg.run.command), error=str(exc))
        return None
    env = child_environment(
        # Before run.env, so a HOME chosen there wins over the user's own.
        {**os.environ, **run_as.environ()} if run_as else os.environ,
        cfg.run.env,
        {
            "SPOT_CHECKPOINT_DIR": str(cfg.checkpoints.local_dir),
            "SPOT_RUN_ID": cfg.run.id,
            "SPOT_NOTICE_FILE": str(cfg.notice_file),
            **(nodes.child_env() if nodes is not None else {}),
        },
    )
    child = TrainerProcess(cfg.run.command, env, cfg.run.workdir, run_as)
    try:
        child.start()
    except OSError as exc:
        log.error("child_start_failed", argv=list(cfg.run.command), error=str(exc))
        return None
    return child


def _remove_quietly(path: Path) -> None:
    """Remove a stale file; a path we cannot remove is logged, never fatal."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("stale_file_not_removed", path=str(path), error=str(exc))
