"""This instance as one node of a multi-node run (``run.nodes`` > 1, CONTRACT §7).

Before every start of the training command, on every node, the local disk is brought
to the newest *global* commit (:func:`align_to_global_commit`), so that all nodes resume
from the same step with every file of it (global ranks may move between incarnations):

1. local ``step-*`` directories that are one node's part, or newer than the newest
   global commit, are set aside under ``<local_dir>/.set-aside/`` (never deleted: they
   may be all that is left of some work, and an operator may want them);
2. the newest global commit is restored in full (every node's files).

A node whose own newest checkpoint is about to be committed by its peers waits for that
first (:func:`wait_for_global_commit`), or the step would be set aside and the work lost.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from daemon import layout
from daemon.notices.base import TextMetadata
from daemon.notices.imds import INSTANCE_ID_PATH, MetadataUnavailable
from daemon.rendezvous import RDZV_ENV, RendezvousIds
from daemon.storage.global_commit import is_node_part
from daemon.storage.store import CheckpointStore, RestoreResult
from daemon.storage.sync import CheckpointSync

log = structlog.get_logger(__name__)

SET_ASIDE_DIR = ".set-aside"


def instance_identity(client: TextMetadata) -> str:
    """The instance id from the metadata service, else the hostname: this machine's name
    in leases, and ``run.node_id``'s default. ``client``: the AWS IMDS client, or another
    cloud's identity reader (``NoticeSources.metadata``, see :mod:`daemon.notices`)."""
    try:
        instance_id = client.get_text(INSTANCE_ID_PATH)
    except MetadataUnavailable as exc:
        log.warning("instance_id_from_hostname", why=f"instance id unavailable: {exc}")
        instance_id = None
    name = (instance_id or socket.gethostname()).strip()
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:128] or "node"


def set_aside(local_dir: Path, path: Path, why: str) -> Path:
    """Move one ``step-*`` directory out of the trainer's sight, keeping its bytes."""
    target_dir = local_dir / SET_ASIDE_DIR
    target_dir.mkdir(exist_ok=True)
    target = target_dir / f"{path.name}-{int(time.time())}-{os.getpid()}"
    path.rename(target)
    layout.fsync_dir(local_dir)
    log.warning("checkpoint_set_aside", path=str(path), to=str(target), why=why)
    return target


def _is_part(path: Path) -> bool:
    try:
        return is_node_part(layout.read_manifest(path))
    except (layout.ManifestError, OSError):
        return False


def align_to_global_commit(store: CheckpointStore, local_dir: Path) -> RestoreResult | None:
    """Set aside what is not (or not yet) globally committed, then restore the newest
    global commit in full. Raises StoreError as a restore does."""
    newest = store.newest_committed_step()
    for step, path in layout.list_step_dirs(local_dir):
        if newest is not None and step > newest:
            set_aside(local_dir, path, f"newer than the newest global commit (step {newest})")
        elif _is_part(path):
            set_aside(local_dir, path, "one node's part: the global commit replaces it")
    result = store.restore_newest(local_dir)
    if result is not None:
        log.info("aligned_to_global_commit", step=result.step, downloaded=result.downloaded)
    return result


def wait_for_global_commit(
    newest_committed: Callable[[], int | None],
    step: int,
    timeout: float,
    *,
    poll: float = 0.5,
    cancelled: Callable[[], bool] = lambda: False,
) -> bool:
    """Wait until ``step`` (or a newer one) is globally committed; whether it was."""
    deadline = time.monotonic() + timeout
    while True:
        committed = newest_committed()
        if committed is not None and committed >= step:
            return True
        if time.monotonic() >= deadline or cancelled():
            return False
        time.sleep(poll)


# How long a node whose trainer stopped because a peer did (no notice of its own) waits
# for the global commit of the step it saved: the peer is draining, and a spot notice
# gives two minutes.
PEER_COMMIT_WAIT_S = 150.0
# How long a node that finished the run waits for the other nodes' final parts.
FINAL_COMMIT_WAIT_S = 300.0
NODE_ID_ENV = "SPOT_NODE_ID"


class MultiNode:
    """What a supervisor does differently as one node of several.

    It names this node in storage, restores the global commit (not a local part) before
    every start, and gives every incarnation of the training command its rendezvous id.
    """

    def __init__(
        self,
        store: CheckpointStore,
        sync: CheckpointSync,
        local_dir: Path,
        node_id: str,
        rdzv: RendezvousIds | None,
    ) -> None:
        self.store = store
        self.sync = sync
        self.local_dir = local_dir
        self.node_id = node_id
        self.rdzv = rdzv  # None: the command names its own rendezvous id
        self.rdzv_id: str | None = None
        store.node_id = node_id

    def restore(self) -> RestoreResult | None:
        """At boot: the newest global commit in full, and the first incarnation's id."""
        result = align_to_global_commit(self.store, self.local_dir)
        self._next_incarnation(result)
        return result

    def rejoin(self, wait_for_step: int | None) -> None:
        """After the trainer ended (crash, a peer's stop): close its rendezvous, commit
        this node's part, wait for the global commit of ``wait_for_step`` (a peer's
        stop), align the local disk with the newest global commit, pick the next id.
        Runs in a thread of its own; raises StoreError."""
        if self.rdzv is not None and self.rdzv_id is not None:
            self.rdzv.close(self.rdzv_id)
        self.sync.sync_pass(skip_superseded=False, reason="rejoin", retry_failed=True)
        if wait_for_step is not None:
            committed = wait_for_global_commit(
                self.sync.commit_parts_now, wait_for_step, PEER_COMMIT_WAIT_S
            )
            log.info(
                "peer_commit_awaited",
                step=wait_for_step,
                committed=committed,
                newest_committed_step=self.sync.stats.newest_committed_step,
            )
        self._next_incarnation(align_to_global_commit(self.store, self.local_dir))

    def _next_incarnation(self, restored: RestoreResult | None) -> None:
        step = restored.step if restored is not None else None
        if self.rdzv is not None:
            self.rdzv_id = self.rdzv.next_id(step)
            log.info("rendezvous_id_chosen", rdzv_id=self.rdzv_id, resume_step=step)

    def child_env(self) -> dict[str, str]:
        """What the training command gets besides CONTRACT §3's variables."""
        env = {NODE_ID_ENV: self.node_id}
        if self.rdzv_id is not None:
            env[RDZV_ENV] = self.rdzv_id
        return env
