"""Boot: from a started process to a held slot, a restored disk and a running sync.

All of it happens before the trainer exists and before the loop, under systemd's start
timeout (kept ahead by :meth:`daemon.loop.MainLoop.keepalive` while a restore takes
long): the run ledger's ``boot`` line, ``complete.json``, a slot (none free: standby
until one is, :mod:`daemon.standby`), the restore (several nodes: the global commit,
:mod:`daemon.nodes`), the multipart leftovers, the sync's first look at the bucket and
its start, the startup budget. What must not live here: the loop, the trainer, and any
"what now?" (a standby's is :mod:`daemon.policy`'s, asked by :mod:`daemon.standby`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon.budget import local_cadence, log_startup_budget, notice_budget
from daemon.config import Config
from daemon.deadline import ThroughputEstimate
from daemon.ledger import RunLedger
from daemon.loop import MainLoop
from daemon.nodes import MultiNode
from daemon.notices.base import TextMetadata
from daemon.progress import newest_local_bytes
from daemon.rendezvous import RendezvousIds, user_chose_rdzv_id
from daemon.sdnotify import Notifier
from daemon.standby import Standby, StopCheck, log_handoff
from daemon.state import Phase, StateMachine
from daemon.storage.lease import Identity, Leases
from daemon.storage.s3client import StoreError
from daemon.storage.store import CheckpointStore, RestoreResult
from daemon.storage.sync import CheckpointSync
from daemon.stores import build_ledger_store

log = structlog.get_logger(__name__)

# At boot only multipart uploads older than this are aborted as leftovers: a younger one
# may be a peer node's or the previous holder's emergency upload in flight (no drain
# lasts an hour).
STALE_UPLOAD_AGE_S = 3600.0


def open_ledger(cfg: Config, node_id: str, metadata: TextMetadata) -> RunLedger:
    """The run ledger of this boot, its ``boot`` line recorded (best effort, never
    blocking): every boot is in it, one that finds the run complete included."""
    ledger = RunLedger(build_ledger_store(cfg))
    ledger.boot(node_id=node_id, nodes=cfg.run.nodes, metadata=metadata)
    return ledger


@dataclass(frozen=True)
class Booted:
    """What boot hands to the loop: the slot's leases, this node of several (None: the
    only one), and what was restored (None: nothing committed yet)."""

    leases: Leases
    nodes: MultiNode | None
    restored: RestoreResult | None


class Boot:
    """The boot sequence of one supervisor, with the parts it needs and nothing else."""

    def __init__(
        self,
        cfg: Config,
        store: CheckpointStore,
        sync: CheckpointSync,
        ledger: RunLedger,
        *,
        state: StateMachine,
        notifier: Notifier,
        loop: MainLoop,
    ) -> None:
        self._cfg, self._store, self._sync, self._ledger = cfg, store, sync, ledger
        self._state, self._notifier, self._loop = state, notifier, loop

    def already_complete(self) -> bool:
        """``complete.json`` is there: the run is finished (phase ``done``)."""
        complete = self._store.read_complete()
        if complete is None:
            return False
        log.info("run_already_complete", run_id=self._cfg.run.id, **complete)
        self._state.transition(Phase.DONE, "run already complete")
        self._notifier.ready("done: run already complete")
        self._notifier.stopping("done")
        return True

    def take_slot(
        self,
        node_id: str,
        instance_id: str,
        pending_stop: StopCheck,
        exit_code_after: Callable[[str], int],
        tick: Callable[[], None],
    ) -> Booted | int:
        """A slot and the restore; none free: standby until one is (``pending_stop``,
        ``exit_code_after`` and ``tick`` are :meth:`Standby.wait`'s). An exit code when
        the standby ends without one (a notice or a stop, the run completed elsewhere)."""
        cfg, ledger = self._cfg, self._ledger
        with self._loop.keepalive():
            leases = Leases(
                self._store,
                cfg.run.nodes,
                Identity.this_boot(node_id, instance_id),
                cfg.daemon.lease_ttl,
            )
            taken = leases.try_acquire()
            nodes = self._join_as_node(node_id) if cfg.run.nodes > 1 else None
            restored = self._restore(nodes)
        if taken is None:
            standby = Standby(
                leases, self._store, self._state, self._notifier, self._loop, cfg.run.nodes
            )
            ledger.standby()
            waited = standby.wait(pending_stop, exit_code_after, tick)
            if isinstance(waited, int):
                return waited
            taken = waited
            with self._loop.keepalive():
                restored = self._restore(nodes)
            handoff = log_handoff(taken, restored)
            ledger.slot_taken(slot=taken.slot, how=taken.how, handoff_seconds=handoff)
        else:
            ledger.slot_taken(slot=taken.slot, how=taken.how)
        return Booted(leases, nodes, restored)

    def start_sync(
        self, restored: RestoreResult | None, notice_s: float, throughput: ThroughputEstimate
    ) -> None:
        """With a slot held: clear the leftovers, learn what is committed, start the sync;
        then log the startup budget (this cloud's ``notice_s``: its notice's length)."""
        with self._loop.keepalive():
            try:
                # Leftovers of a machine that went away mid-upload: they cost storage and
                # are never part of a commit. Boot time, like the restore.
                self._store.abort_incomplete_uploads(older_than=STALE_UPLOAD_AGE_S)
            except StoreError as exc:
                log.warning("multipart_cleanup_failed", error=str(exc))
            self._sync.load_remote()
        self._sync.start()
        step = restored.step if restored is not None else None
        log.info("restore_finished", step=step)
        cfg = self._cfg
        local_dir = cfg.checkpoints.local_dir
        log_startup_budget(
            notice_budget(
                cfg.imds.provider,
                notice_s,
                newest_local_bytes(local_dir),
                throughput.bytes_per_second if throughput.measured else None,
                cfg.daemon.safety_margin,
                local_cadence(local_dir),
            )
        )

    def _restore(self, nodes: MultiNode | None) -> RestoreResult | None:
        if nodes is not None:
            restored = nodes.restore()
        else:
            restored = self._store.restore_newest(self._cfg.checkpoints.local_dir)
        if restored is not None:
            self._ledger.restore(
                step=restored.step,
                bytes=restored.bytes,
                seconds=restored.seconds,
                downloaded=restored.downloaded,
            )
        return restored

    def _join_as_node(self, node_id: str) -> MultiNode:
        cfg = self._cfg
        user_rdzv = user_chose_rdzv_id(cfg.run.command, {**os.environ, **cfg.run.env})
        if user_rdzv:
            log.warning(
                "rendezvous_id_user_chosen",
                why="the command names its own rendezvous id: torchrun closes it when it "
                "exits, so a restarted command may not rejoin; leave it to the supervisor",
            )
        log.info("node_joined", node_id=node_id, nodes=cfg.run.nodes)
        return MultiNode(
            self._store,
            self._sync,
            cfg.checkpoints.local_dir,
            node_id,
            None if user_rdzv else RendezvousIds(self._store),
        )
