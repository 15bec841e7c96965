"""The supervisor: restore, run the trainer, carry a notice into it, commit, stop in order.

Signal handlers only record; the main loop acts. Once the trainer runs, the main loop
does no network I/O itself: the sync thread, the notice watcher and short-lived worker
threads (the final flush, the complete.json write) do it, while the loop keeps pinging
systemd's watchdog and the drain clock whatever the network does. Boot (reading
complete.json, the slot, the restore: :mod:`daemon.boot`) happens before the loop,
under systemd's start timeout.

The loop only waits (:mod:`daemon.loop`), asks (:mod:`daemon.policy`), acts and logs the
transition. Acting is done by the parts it owns, each in a module of its own: the drain
(:mod:`daemon.drain`), the trainer's own exits and hangs and the restarts that follow
(:mod:`daemon.exits`), its progress on the local disk (:mod:`daemon.progress`), its
start (:mod:`daemon.launch`), the run's last steps (:mod:`daemon.ending`), scheduled
maintenance (:mod:`daemon.maintenance`). No decision lives here.
"""

from __future__ import annotations

import datetime as dt
import queue
import signal
import time

import structlog

from daemon.boot import Boot, Booted, open_ledger
from daemon.child import TrainerProcess, become_subreaper
from daemon.config import Config
from daemon.deadline import ThroughputEstimate
from daemon.drain import TICK_S, Drain, Drainer
from daemon.ending import Ending
from daemon.exits import Restarts, TrainerExits
from daemon.launch import start_trainer
from daemon.ledger import RunLedger
from daemon.loop import IDLE_WAIT_S, MainLoop
from daemon.maintenance import MAINTENANCE_LEAD_S, MaintenanceSchedule
from daemon.memory import release_free_memory
from daemon.metrics import Metrics, TextfileWriter
from daemon.nodes import MultiNode, instance_identity
from daemon.notices import Notice, build_sources
from daemon.notices.watch import NoticeWatcher
from daemon.policy import Step, exit_code_after_drain, on_notice
from daemon.progress import ProgressWatch, newest_local_bytes, newest_local_checkpoint
from daemon.sdnotify import Notifier
from daemon.state import Phase, StateMachine
from daemon.storage.s3client import StoreError
from daemon.storage.store import CheckpointStore, RemoteCheckpoint
from daemon.storage.sync import CheckpointSync, SyncStats
from daemon.stores import build_store

# Importable from here, as before they had modules of their own (daemon.cli,
# daemon.preflight, the tools): the store from the config, the local disk's newest.
__all__ = ["Supervisor", "build_store", "newest_local_bytes", "newest_local_checkpoint"]

log = structlog.get_logger(__name__)

_METRICS_EVERY = 15.0
# The most the ledger's last write may delay the exit (it comes after every commit).
LEDGER_CLOSE_S = 2.0


class Supervisor:
    """One ``spot-supervisor run``: from boot to an orderly exit."""

    def __init__(self, cfg: Config, store: CheckpointStore | None = None) -> None:
        self.cfg = cfg
        self.notifier = Notifier()
        self.state = StateMachine(cfg.state_file, cfg.run.id, on_phase=self._phase_changed)
        self.store = store or build_store(cfg)
        self.throughput = ThroughputEstimate()
        self.sync = CheckpointSync(
            self.store,
            cfg.checkpoints.local_dir,
            self.throughput,
            cfg.daemon.rescan_interval,
            on_change=self._sync_changed,
            keep_remote=cfg.checkpoints.keep_remote,
            # One instance deletes: the holder of slot 0 (never a standby, never a peer).
            retention_allowed=lambda: self.ending.slot == 0,
            on_commit=self._ledger_commit,
        )
        # The run ledger (<remote>/<run.id>/ledger/<boot>.jsonl): best effort, never
        # blocking, started at boot once the instance is known.
        self.ledger: RunLedger | None = None
        self._starts = 0
        self.events: queue.Queue[Notice] = queue.Queue()
        self.loop = MainLoop(self.notifier)
        # imds.provider's notice sources (AWS, GCP, Azure) and its instance facts.
        sources = self._sources = build_sources(cfg)
        self._imds = sources.metadata
        self._maintenance_source = sources.maintenance
        self.watcher = NoticeWatcher(
            sources.watched,
            on_notice=self._on_notice,
            poll_interval=cfg.imds.poll_interval,
            request_counter=sources.request_counter,
        )
        self.metrics = Metrics(run_id=cfg.run.id)
        self.textfile = TextfileWriter(cfg.metrics.textfile, self.metrics)
        self._metrics_at = 0.0
        self.maintenance = MaintenanceSchedule(self._maintenance_due_in)
        self.progress = ProgressWatch(
            cfg.checkpoints.local_dir, cfg.daemon.progress_timeout, self._first_step
        )
        self.ending = Ending(self.sync, self.store, self.state, self.notifier, self.loop)
        self.child: TrainerProcess | None = None
        self.drain: Drain | None = None
        # Set at boot, once a slot is held (see _hold): run.nodes > 1: this instance as
        # one node of several; the restarts, the trainer's exits, the drain.
        self.nodes: MultiNode | None = None
        self.restarts: Restarts
        self.exits: TrainerExits
        self.drainer: Drainer

    # --- plumbing --------------------------------------------------------------------

    def _phase_changed(self, phase: Phase, why: str) -> None:
        self.notifier.status(f"{phase.value}: {why}")

    def _sync_changed(self, stats: SyncStats) -> None:
        # The sync's thread: status only. Progress is read from the disk by the main
        # loop (daemon.progress), not from the sync, whose passes can be slow.
        self.state.update(
            newest_local_step=stats.newest_local_step,
            newest_committed_step=stats.newest_committed_step,
            last_upload_mbps=stats.last_upload_mbps,
        )

    def _on_notice(self, notice: Notice) -> None:
        # The watcher's thread: hand over, then wake the main loop.
        self.events.put(notice)
        self.loop.wake()

    def _ledger_commit(self, remote: RemoteCheckpoint, seconds: float) -> None:
        if self.ledger is not None:
            m = remote.manifest
            self.ledger.commit(
                step=m.step,
                reason=m.reason,
                bytes=m.total_bytes,
                seconds=seconds,
                created_at=m.created_at,
            )

    def _first_step(self, step: int) -> None:
        if self.ledger is not None:
            self.ledger.first_step(step=step)

    def _next_wakeup(self) -> float:
        """Seconds until the loop must look again even if nothing wakes it."""
        now = time.monotonic()
        due = [now + IDLE_WAIT_S]
        watchdog = self.loop.next_watchdog()
        if watchdog is not None:
            due.append(watchdog)
        if self.drain is not None:
            due.append(now + TICK_S)  # the drain clock and the trainer's exit, closely
        if self.restarts.at is not None:
            due.append(self.restarts.at)
        hang_check = self.progress.due_at()
        if hang_check is not None and self.state.phase is Phase.TRAINING:
            due.append(hang_check)
        return max(0.0, min(due) - now)

    def _write_metrics(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.textfile.path is None or (not force and now - self._metrics_at < _METRICS_EVERY):
            return
        stats = self.sync.stats
        m = self.metrics
        m.phase = self.state.phase.value
        m.checkpoints_committed = stats.committed
        m.bytes_uploaded = stats.bytes_uploaded
        m.upload_seconds = stats.upload_seconds
        if stats.newest_committed_step != m.newest_committed_step:
            m.newest_committed_step = stats.newest_committed_step
            m.newest_committed_at = time.time() if stats.newest_committed_step is not None else None
        m.trainer_restarts = self.state.snapshot().restarts
        m.metadata_failures = self.watcher.stats().failures
        self.textfile.write()
        self._metrics_at = now

    def _check_sync_alive(self) -> None:
        """The background sync must never die silently: restart its thread if it did."""
        self.sync.restart_if_dead()

    def _exit_code_after(self, source: str) -> int:
        return exit_code_after_drain(source, self.cfg.daemon.exit_code_after_notice)

    # --- the run -----------------------------------------------------------------------

    def run(self) -> int:
        """Boot to exit; the exit code follows CONTRACT §1."""
        become_subreaper()
        self.loop.install_signal_handlers()
        self.state.transition(Phase.RESTORING, "boot")
        code = 1
        try:
            code = self._boot()
        except StoreError as exc:
            # S3 unreachable, bucket missing, access denied...: nothing local is touched,
            # and systemd's Restart=on-failure tries again.
            log.error("boot_failed", error=str(exc), code=exc.code)
            self.state.transition(Phase.FAILED, f"object storage: {exc}")
            self.notifier.stopping("failed")
        finally:
            if self.ledger is not None:
                # The last thing, after any commit: bounded, and never the run's failure.
                self.ledger.exit(code=code)
                self.ledger.close(timeout=LEDGER_CLOSE_S)
        return code

    def _boot(self) -> int:
        instance_id = instance_identity(self._imds)
        node_id = self.cfg.run.node_id or instance_id
        ledger = self.ledger = open_ledger(self.cfg, node_id, self._imds)
        boot = Boot(
            self.cfg,
            self.store,
            self.sync,
            ledger,
            state=self.state,
            notifier=self.notifier,
            loop=self.loop,
        )
        if boot.already_complete():
            return 0
        self.watcher.start()
        try:
            booted = boot.take_slot(
                node_id, instance_id, self._pending_stop, self._exit_code_after, self._write_metrics
            )
            if isinstance(booted, int):
                return booted  # the standby ended: a notice or a stop, or done elsewhere
            self._hold(booted, ledger)
            boot.start_sync(booted.restored, self._sources.notice_s, self.throughput)
            if self._pending_stop() is None:
                if not self._start_child():
                    return self.exits.give_up("training command could not be started")
                self.notifier.ready(f"training: child pid {self.child.pid if self.child else '?'}")
            else:
                self.notifier.ready("draining before start")
            # The restore's buffers and start-up's parsing are garbage now: give it back.
            release_free_memory()
            return self._loop()
        finally:
            self.watcher.stop()
            self._sources.close()
            self._write_metrics(force=True)
            self.ending.close()

    def _hold(self, booted: Booted, ledger: RunLedger) -> None:
        """A slot is ours: keep it, and make the parts the loop acts through."""
        cfg, nodes = self.cfg, booted.nodes
        self.nodes = nodes
        self.ending.hold_slot(booted.leases)
        self.restarts = Restarts(cfg.daemon.restart_window, cfg.daemon.max_restarts, nodes)
        self.exits = TrainerExits(
            self.ending,
            self.restarts,
            self.progress,
            ledger,
            store=self.store,
            sync=self.sync,
            state=self.state,
            loop=self.loop,
            local_dir=cfg.checkpoints.local_dir,
            several_nodes=nodes is not None,
        )
        self.drainer = Drainer(
            cfg,
            self._sources,
            self.throughput,
            self.ending,
            ledger,
            sync=self.sync,
            state=self.state,
            notifier=self.notifier,
            loop=self.loop,
            several_nodes=nodes is not None,
        )

    def _start_child(self) -> bool:
        child = start_trainer(self.cfg, self.nodes)
        if child is None:
            return False
        self.child = child
        self.state.update(child_pid=child.pid)
        # Progress is counted from each start: restore and backoff are not the trainer's.
        start_step = self.progress.started()
        self._starts += 1
        if self.ledger is not None:
            self.ledger.train_start(step=start_step, attempt=self._starts)
        self.state.transition(Phase.TRAINING, "child started", pid=child.pid)
        return True

    # --- the loop: wait, ask, act ---------------------------------------------------------

    def _loop(self) -> int:
        while True:
            self.loop.ping_watchdog()
            if self.drain is None:
                stop = self._pending_stop()
                if stop is not None:
                    self.drain = self.drainer.begin(*stop, self.child)
            exit_status = self.child.poll() if self.child else None
            if self.drain is None and self.state.phase is Phase.TRAINING:
                self.progress.observe()  # one directory listing: the ledger, the hang check
            if self.drain is not None:
                if self.child is None or exit_status is not None:
                    return self.drainer.finish(self.drain, self.child)
                if self.drain.plan.seconds_left() <= 0:
                    log.warning("drain_deadline_reached", **self.drain.plan.as_fields())
                    self.child.kill_tree("drain deadline reached")
                    return self.drainer.finish(self.drain, self.child)
            elif self.state.phase is Phase.BACKOFF:
                step = self.restarts.due()
                if step is Step.CRASH:
                    # Could not align with the global commit (S3 down): not safe to start.
                    code = self.exits.crashed(f"rejoin failed: {self.restarts.rejoin_error}")
                    if code is not None:
                        return code
                elif step is Step.START and not self._start_child():
                    return self.exits.give_up("training command could not be restarted")
            elif exit_status is not None:
                assert self.child is not None
                code = self.exits.exited(self.child, exit_status)
                if code is not None:
                    return code
            elif (quiet := self._progress_overdue()) is not None:
                assert self.child is not None
                code = self.exits.hung(self.child, quiet)
                if code is not None:
                    return code
            if self.drain is None:
                self._check_maintenance()
            self._check_sync_alive()
            self._write_metrics()
            self.loop.wait(self._next_wakeup())

    def _progress_overdue(self) -> float | None:
        """Seconds without a new checkpoint from the running trainer, once past
        ``daemon.progress_timeout`` (None while within it, or with the check off)."""
        if self.child is None or self.state.phase is not Phase.TRAINING:
            return None
        return self.progress.overdue()

    def _pending_stop(self) -> tuple[str, str, dt.datetime] | None:
        """A notice or a stop signal that means: drain now (in standby: exit).
        ``(action, source, deadline)``; every other notice is acted on here, as
        :mod:`daemon.policy` says."""
        if self.loop.stop_signal is not None:
            deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(
                seconds=self.cfg.daemon.stop_budget
            )
            if self.ledger is not None and self.drain is None:
                self.ledger.notice(kind="signal", action="shutdown", deadline=deadline)
            return ("shutdown", "signal", deadline)
        while True:
            try:
                notice = self.events.get_nowait()
            except queue.Empty:
                break
            self.state.update(last_notice=notice.to_dict())
            self.metrics.notices[notice.action] = self.metrics.notices.get(notice.action, 0) + 1
            if self.ledger is not None:
                self.ledger.notice(kind=notice.kind, action=notice.action, deadline=notice.deadline)
            step = on_notice(notice.kind, notice.action, standby=self.state.phase is Phase.STANDBY)
            if step in (Step.DRAIN, Step.EXIT_DONE):
                return (notice.action, notice.source, notice.deadline)
            if step is Step.CHECKPOINT:
                sent = self.child.send(signal.SIGUSR1) if self.child else False
                event = "hibernate" if notice.action == "hibernate" else "early"
                log.warning(f"{event}_checkpoint_requested", id=notice.id, child_signalled=sent)
            elif step is Step.SCHEDULE:
                self.maintenance.schedule(notice)
            else:
                log.info("notice_ignored", id=notice.id, kind=notice.kind, action=notice.action)
        return None

    # --- scheduled maintenance -------------------------------------------------------------

    def _check_maintenance(self) -> None:
        """Ask for the checkpoint of each scheduled event now due (see daemon.maintenance)."""
        for key, sched in self.maintenance.due(self._maintenance_source.active_event_ids()):
            if self.child is None or self.state.phase is not Phase.TRAINING:
                continue  # no trainer to ask right now: ask once it runs again
            self.maintenance.requested(key, sched, self.child.send(signal.SIGUSR1))

    def _maintenance_due_in(self, notice: Notice) -> float:
        """Seconds until a checkpoint must be asked for, to be committed before the event:
        the lead a spot notice would give, plus the upload reserve and the safety margin."""
        reserve = self.throughput.seconds_for(newest_local_bytes(self.cfg.checkpoints.local_dir))
        left = (notice.deadline - dt.datetime.now(dt.timezone.utc)).total_seconds()
        return left - MAINTENANCE_LEAD_S - reserve - self.cfg.daemon.safety_margin
