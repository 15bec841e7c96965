"""The supervisor: restore, run the trainer, carry a notice into it, commit, stop in order.

Signal handlers only record; the main loop acts. Once the trainer runs, the main loop
does no network I/O itself: the sync thread, the notice watcher and short-lived worker
threads (the final flush, the complete.json write) do it, while the loop keeps pinging
systemd's watchdog and the drain clock whatever the network does. Boot (reading
complete.json, the restore) happens before the loop, under systemd's start timeout.

What a trainer's exit means is decided here, and never from its exit code alone:

* exit 0 with a newest checkpoint of reason ``final``: the run is finished; commit it,
  then write ``complete.json``;
* exit 0 after any other save: someone else stopped it (an operator's ``kill``, a peer
  rank's stop under torchrun); commit what it saved and start it again;
* anything else: a crash; kill what is left of its tree, back off, restart.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import signal
import time
from pathlib import Path

import structlog

from daemon import layout
from daemon.budget import (
    emergency_decision,
    local_cadence,
    log_emergency_decision,
    log_startup_budget,
    notice_budget,
)
from daemon.child import ExitStatus, TrainerProcess, become_subreaper, child_environment
from daemon.config import Config
from daemon.deadline import ThroughputEstimate
from daemon.drain import Drain, emergency_commit, plan_for, write_notice_file
from daemon.ledger import RunLedger
from daemon.loop import IDLE_WAIT_S, MainLoop
from daemon.maintenance import MAINTENANCE_LEAD_S, MaintenanceSchedule
from daemon.metrics import Metrics, TextfileWriter
from daemon.nodes import FINAL_COMMIT_WAIT_S, MultiNode, instance_identity
from daemon.notices import (
    Notice,
    build_sources,
)
from daemon.notices.watch import NoticeWatcher
from daemon.policy import Step, exit_code_after_drain, on_hang, on_notice, on_trainer_exit
from daemon.rendezvous import RendezvousIds, user_chose_rdzv_id
from daemon.sdnotify import Notifier
from daemon.standby import Standby, log_handoff
from daemon.state import Phase, StateMachine
from daemon.storage.backend import build_blob_store, is_blob_remote
from daemon.storage.lease import Heartbeat, Identity, Leases
from daemon.storage.s3client import (
    StoreError,
    checksum_algorithm,
    make_s3_client,
    make_transfer_config,
    parse_remote,
    use_crt,
)
from daemon.storage.store import CheckpointStore, RemoteCheckpoint, RestoreResult
from daemon.storage.sync import CheckpointSync, FlushHandle, SyncStats

log = structlog.get_logger(__name__)

_TICK = 0.05
_MAX_BACKOFF = 60.0
_METRICS_EVERY = 15.0
# At boot only multipart uploads older than this are aborted as leftovers: a younger one
# may be a peer node's or the previous holder's emergency upload in flight (no drain
# lasts an hour).
STALE_UPLOAD_AGE_S = 3600.0
# The most the ledger's last write may delay the exit (it comes after every commit).
LEDGER_CLOSE_S = 2.0
# How often a standby looks for a free slot (and for the run's completion elsewhere).
STANDBY_POLL_S = 1.5


def build_store(cfg: Config) -> CheckpointStore:
    """The S3 checkpoint store for this run, from the config."""
    if is_blob_remote(cfg.checkpoints.remote):
        return build_blob_store(cfg)  # gs:// or az://: the same store on another service
    location = parse_remote(cfg.checkpoints.remote)
    concurrency = cfg.s3.max_concurrency
    algo = checksum_algorithm(cfg.s3.checksum_algorithm)
    # A connection per concurrent request, plus headroom for the stager and listings.
    client = make_s3_client(
        cfg.s3.endpoint_url,
        cfg.s3.region,
        2 * concurrency + 2,
        request_checksums=algo is not None,
    )
    transfer = make_transfer_config(cfg.s3.part_size_mb * 1024 * 1024, concurrency)
    return CheckpointStore(
        client,
        location,
        cfg.run.id,
        transfer,
        checksum_algorithm=algo,
        crt=use_crt(cfg.s3.endpoint_url),
    )


def newest_local_bytes(local_dir: Path) -> int:
    """Bytes of the newest complete local checkpoint: the emergency one will be about as big."""
    newest = newest_local_checkpoint(local_dir)
    return newest[1].total_bytes if newest is not None else 0


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
            retention_allowed=lambda: getattr(self, "leases", None) is not None
            and self.leases.slot == 0,
            on_commit=self._ledger_commit,
        )
        # The run ledger (<remote>/<run.id>/ledger/<boot>.jsonl): best effort, never
        # blocking, started at boot once the instance is known.
        self.ledger: RunLedger | None = None
        self._first_step_pending = False
        self._starts = 0
        self._instance_id = ""
        self._node_id = ""
        self.events: queue.Queue[Notice] = queue.Queue()
        self.loop = MainLoop(self.notifier)
        # imds.provider's notice sources (AWS, GCP, Azure) and its instance facts.
        sources = self._sources = build_sources(cfg)
        self._imds = sources.metadata
        self._emergency_skipped: FlushHandle | None = None
        # run.nodes > 1: this instance as one node of several (set up at boot).
        self.nodes: MultiNode | None = None
        self._rejoin: FlushHandle | None = None
        self.leases: Leases  # set at boot, once the instance is known
        self._heartbeat: Heartbeat | None = None
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
        self.child: TrainerProcess | None = None
        self.drain: Drain | None = None
        self._failures: list[float] = []
        # The trainer's progress: the newest local step, and when it last changed.
        self._progress_step: int | None = None
        self._progress_at = time.monotonic()
        # The newest local step when the running trainer started: did it get anywhere?
        self._start_step: int | None = None
        self._restart_at: float | None = None
        self._flush: FlushHandle | None = None

    # --- plumbing --------------------------------------------------------------------

    def _phase_changed(self, phase: Phase, why: str) -> None:
        self.notifier.status(f"{phase.value}: {why}")

    def _sync_changed(self, stats: SyncStats) -> None:
        # The sync's thread: status only. Progress is read from the disk by the main
        # loop (:meth:`_observe_progress`), not from the sync, whose passes can be slow.
        self.state.update(
            newest_local_step=stats.newest_local_step,
            newest_committed_step=stats.newest_committed_step,
            last_upload_mbps=stats.last_upload_mbps,
        )

    def _on_notice(self, notice: Notice) -> None:
        # The watcher's thread: hand over, then wake the main loop.
        self.events.put(notice)
        self.loop.wake()

    def _next_wakeup(self) -> float:
        """Seconds until the loop must look again even if nothing wakes it."""
        now = time.monotonic()
        due = [now + IDLE_WAIT_S]
        watchdog = self.loop.next_watchdog()
        if watchdog is not None:
            due.append(watchdog)
        if self.drain is not None:
            due.append(now + _TICK)  # the drain clock and the trainer's exit, closely
        if self._restart_at is not None:
            due.append(self._restart_at)
        if self.cfg.daemon.progress_timeout and self.state.phase is Phase.TRAINING:
            due.append(self._progress_at + self.cfg.daemon.progress_timeout)
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

    def _await_flush(self, why: str, wait_global_s: float = 0.0) -> int | None:
        """A final flush off the main loop, which keeps systemd's watchdog fed meanwhile."""
        flush = self._flush = self.sync.flush_async(wait_global_s)
        self.loop.wait_done(flush)
        if flush.error is not None:
            log.error("final_flush_failed", why=why, error=flush.error)
        return flush.committed

    def _check_sync_alive(self) -> None:
        """The background sync must never die silently: restart its thread if it did."""
        self.sync.restart_if_dead()

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
        self._instance_id = instance_identity(self._imds)
        self._node_id = self.cfg.run.node_id or self._instance_id
        # Every boot is in the ledger, one that finds the run complete included.
        self.ledger = RunLedger(self._ledger_store())
        self.ledger.boot(node_id=self._node_id, nodes=self.cfg.run.nodes, metadata=self._imds)
        complete = self.store.read_complete()
        if complete is not None:
            log.info("run_already_complete", run_id=self.cfg.run.id, **complete)
            self.state.transition(Phase.DONE, "run already complete")
            self.notifier.ready("done: run already complete")
            self.notifier.stopping("done")
            return 0
        self.watcher.start()
        try:
            return self._run_restored()
        finally:
            self.watcher.stop()
            self._sources.close()
            if self._heartbeat is not None:
                self._heartbeat.stop()
            self._write_metrics(force=True)
            if self._flush is None or self._flush.done.is_set():
                # A flush still stuck on the network past the deadline is left behind.
                self.sync.stop()
                self.store.close()

    def _run_restored(self) -> int:
        ledger = self.ledger
        assert ledger is not None  # made at boot
        with self.loop.keepalive():
            node_id = self._node_id
            self.leases = Leases(
                self.store,
                self.cfg.run.nodes,
                Identity.this_boot(node_id, self._instance_id),
                self.cfg.daemon.lease_ttl,
            )
            taken = self.leases.try_acquire()
            if self.cfg.run.nodes > 1:
                self.nodes = self._join_as_node(node_id)
            restored = self._restore()
        if taken is None:
            standby = Standby(
                self.leases, self.store, self.state, self.notifier, self.loop, self.cfg.run.nodes
            )
            ledger.standby()
            waited = standby.wait(self._pending_stop, self._exit_code_after, self._write_metrics)
            if isinstance(waited, int):
                return waited
            taken = waited
            with self.loop.keepalive():
                restored = self._restore()
            handoff = log_handoff(taken, restored)
            ledger.slot_taken(slot=taken.slot, how=taken.how, handoff_seconds=handoff)
        else:
            ledger.slot_taken(slot=taken.slot, how=taken.how)
        self._heartbeat = Heartbeat(self.leases)
        self._heartbeat.start()
        with self.loop.keepalive():
            try:
                # Leftovers of a machine that went away mid-upload: they cost storage and
                # are never part of a commit. Boot time, like the restore.
                self.store.abort_incomplete_uploads(older_than=STALE_UPLOAD_AGE_S)
            except StoreError as exc:
                log.warning("multipart_cleanup_failed", error=str(exc))
            self.sync.load_remote()
        self.sync.start()
        step = restored.step if restored is not None else None
        log.info("restore_finished", step=step)
        local_dir = self.cfg.checkpoints.local_dir
        log_startup_budget(
            notice_budget(
                self.cfg.imds.provider,
                self._sources.notice_s,
                newest_local_bytes(local_dir),
                self.throughput.bytes_per_second if self.throughput.measured else None,
                self.cfg.daemon.safety_margin,
                local_cadence(local_dir),
            )
        )
        if self._pending_stop() is None:
            if not self._start_child():
                return self._give_up("training command could not be started")
            self.notifier.ready(f"training: child pid {self.child.pid if self.child else '?'}")
        else:
            self.notifier.ready("draining before start")
        return self._loop()

    def _restore(self) -> RestoreResult | None:
        if self.nodes is not None:
            restored = self.nodes.restore()
        else:
            restored = self.store.restore_newest(self.cfg.checkpoints.local_dir)
        if self.ledger is not None and restored is not None:
            self.ledger.restore(
                step=restored.step,
                bytes=restored.bytes,
                seconds=restored.seconds,
                downloaded=restored.downloaded,
            )
        return restored

    # --- the run ledger ---------------------------------------------------------------

    def _ledger_store(self) -> CheckpointStore:
        """A store of its own for the ledger: short timeouts and few retries, so a ledger
        write never holds a connection the commits need, and gives up quickly."""
        cfg = self.cfg
        if is_blob_remote(cfg.checkpoints.remote):
            return build_blob_store(cfg, max_concurrency=1)
        client = make_s3_client(
            cfg.s3.endpoint_url,
            cfg.s3.region,
            2,
            max_attempts=2,
            connect_timeout=2.0,
            read_timeout=5.0,
            request_checksums=False,
        )
        transfer = make_transfer_config(cfg.s3.part_size_mb * 1024 * 1024, 1)
        return CheckpointStore(client, parse_remote(cfg.checkpoints.remote), cfg.run.id, transfer)

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

    # --- slots and standby ---------------------------------------------------------------

    def _release_slot(self, committed: int | None) -> None:
        """After the emergency commit, the completion or an orderly stop: free the slot
        for a standby (off the main loop: it is S3 I/O)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.loop.off_loop(lambda: self.leases.release(committed), "lease-release")

    def _exit_code_after(self, source: str) -> int:
        return exit_code_after_drain(source, self.cfg.daemon.exit_code_after_notice)

    def _join_as_node(self, node_id: str) -> MultiNode:
        cfg = self.cfg
        user_rdzv = user_chose_rdzv_id(cfg.run.command, {**os.environ, **cfg.run.env})
        if user_rdzv:
            log.warning(
                "rendezvous_id_user_chosen",
                why="the command names its own rendezvous id: torchrun closes it when it "
                "exits, so a restarted command may not rejoin; leave it to the supervisor",
            )
        log.info("node_joined", node_id=node_id, nodes=cfg.run.nodes)
        return MultiNode(
            self.store,
            self.sync,
            cfg.checkpoints.local_dir,
            node_id,
            None if user_rdzv else RendezvousIds(self.store),
        )

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

    def _start_child(self) -> bool:
        from daemon.runas import prepare_for

        cfg = self.cfg
        _remove_quietly(cfg.notice_file)
        try:
            # run.user: the child's identity, and local_dir handed to it (None: as we run).
            run_as = prepare_for(cfg)
        except (OSError, LookupError) as exc:
            log.error("child_start_failed", argv=list(cfg.run.command), error=str(exc))
            return False
        env = child_environment(
            # Before run.env, so a HOME chosen there wins over the user's own.
            {**os.environ, **run_as.environ()} if run_as else os.environ,
            cfg.run.env,
            {
                "SPOT_CHECKPOINT_DIR": str(cfg.checkpoints.local_dir),
                "SPOT_RUN_ID": cfg.run.id,
                "SPOT_NOTICE_FILE": str(cfg.notice_file),
                **(self.nodes.child_env() if self.nodes is not None else {}),
            },
        )
        self.child = TrainerProcess(cfg.run.command, env, cfg.run.workdir, run_as)
        try:
            pid = self.child.start()
        except OSError as exc:
            log.error("child_start_failed", argv=list(cfg.run.command), error=str(exc))
            return False
        self.state.update(child_pid=pid)
        # Progress is counted from each start: restore and backoff are not the trainer's.
        self._progress_at = time.monotonic()
        local = layout.list_step_dirs(cfg.checkpoints.local_dir)
        self._start_step = local[0][0] if local else None
        self._progress_step = self._start_step
        self._starts += 1
        self._first_step_pending = True
        if self.ledger is not None:
            self.ledger.train_start(step=self._start_step, attempt=self._starts)
        self.state.transition(Phase.TRAINING, "child started", pid=pid)
        return True

    def _loop(self) -> int:
        while True:
            self.loop.ping_watchdog()
            if self.drain is None:
                stop = self._pending_stop()
                if stop is not None:
                    self._begin_drain(*stop)
            exit_status = self.child.poll() if self.child else None
            if self.drain is None and self.state.phase is Phase.TRAINING:
                self._observe_progress()  # one directory listing: the ledger, the hang check
            if self.drain is not None:
                if self.child is None or exit_status is not None:
                    return self._finish_drain()
                if self.drain.plan.seconds_left() <= 0:
                    log.warning("drain_deadline_reached", **self.drain.plan.as_fields())
                    self.child.kill_tree("drain deadline reached")
                    return self._finish_drain()
            elif self.state.phase is Phase.BACKOFF:
                due = self._restart_at is not None and time.monotonic() >= self._restart_at
                rejoined = self._rejoin is None or self._rejoin.done.is_set()
                if due and rejoined and self._rejoin is not None and self._rejoin.error:
                    # Could not align with the global commit (S3 down): not safe to start.
                    code = self._crashed(f"rejoin failed: {self._rejoin.error}")
                    if code is not None:
                        return code
                elif due and rejoined:
                    self._restart_at = None
                    self._rejoin = None
                    if not self._start_child():
                        return self._give_up("training command could not be restarted")
            elif exit_status is not None:
                code = self._trainer_exited(exit_status)
                if code is not None:
                    return code
            elif (quiet := self._progress_overdue()) is not None:
                code = self._hung(quiet)
                if code is not None:
                    return code
            if self.drain is None:
                self._check_maintenance()
            self._check_sync_alive()
            self._write_metrics()
            self.loop.wait(self._next_wakeup())

    # --- drain: notice or stop -----------------------------------------------------------

    def _begin_drain(self, action: str, source: str, deadline_wall: dt.datetime) -> None:
        """In order: plan the drain, write the notice file, SIGTERM the trainer, stage the
        emergency checkpoint's files as they land (threads only: no S3 I/O here)."""
        drain = self.drain = plan_for(
            action,
            source,
            deadline_wall,
            safety_margin=self.cfg.daemon.safety_margin,
            reserve_bytes=newest_local_bytes(self.cfg.checkpoints.local_dir),
            throughput=self.throughput,
        )
        write_notice_file(self.cfg.notice_file, drain)
        signalled = self.child.send(signal.SIGTERM) if self.child else False
        decision = emergency_decision(
            self.cfg.imds.provider,
            self._sources.notice_s,
            drain.plan.reserve_bytes,
            self.throughput.bytes_per_second,
            self.throughput.measured,
            drain.plan.cancel_in(),
        )
        log_emergency_decision(decision)
        if decision.commit:
            self.sync.begin_emergency()
        else:
            # Start no upload that cannot finish: the sync completes the commit it is
            # sending (a periodic one may still make it) and takes nothing new.
            sync = self.sync

            def finish_in_flight() -> int | None:
                sync.stop()
                return sync.stats.newest_committed_step

            self._emergency_skipped = FlushHandle(finish_in_flight, name="sync-stop")
        self.state.update(drain_deadline=deadline_wall.isoformat())
        self.notifier.extend_timeout(max(drain.plan.notice_deadline - time.monotonic(), 0) + 30)
        self.state.transition(
            Phase.DRAINING,
            f"{action} from {source}",
            deadline=deadline_wall.isoformat(),
            child_signalled=signalled,
            **drain.plan.as_fields(),
        )

    def _finish_drain(self) -> int:
        """The emergency commit (daemon.drain), then the slot, then an orderly exit."""
        assert self.drain is not None
        if self.child is not None:
            self.child.kill_leftovers()
        self.state.update(child_pid=None)
        self.state.transition(Phase.UPLOADING, "emergency commit", **self.drain.plan.as_fields())
        committed, fields, self._flush = emergency_commit(
            self.drain,
            self.sync,
            self.loop,
            self.cfg.checkpoints.local_dir,
            several_nodes=self.nodes is not None,
            skipped=self._emergency_skipped,
        )
        # Azure: approve the Preempt/Terminate event now, never before the commit.
        newest_in_storage = committed is not None and committed == fields.get("newest_local_step")
        self.loop.off_loop(
            lambda: self._sources.after_emergency_commit(newest_in_storage), "event-approval"
        )
        # The slot is free for a standby (or a replacement) only now, after the commit.
        self._release_slot(committed)
        if self.ledger is not None:
            self.ledger.stop(
                reason=self.drain.action,
                committed_step=committed,
                local_step=fields.get("newest_local_step"),
            )
        self.state.transition(Phase.DONE, "shut down in order", **fields)
        self.notifier.stopping("done")
        return self._exit_code_after(self.drain.source)

    # --- completion and crashes ------------------------------------------------------------

    def _trainer_exited(self, status: ExitStatus) -> int | None:
        """The trainer ended without our signal: finished, stopped by someone else, or crashed.

        Whatever it left running (data-loader workers, torchrun's ranks, a shell's
        children) is killed and reaped first, so a restart never runs beside it.
        """
        assert self.child is not None
        self.child.kill_leftovers()
        local_dir = self.cfg.checkpoints.local_dir
        newest = newest_local_checkpoint(local_dir) if status.success else None
        start = self._start_step
        progressed = newest is not None and (start is None or newest[0] > start)
        step = on_trainer_exit(
            success=status.success,
            newest_reason=newest[1].reason if newest is not None else None,
            progressed=progressed,
        )
        if newest is None or step in (Step.COMPLETE, Step.CONFIG_ERROR):
            # A crash; or the run's end (COMPLETE), or no checkpoint at all (exit 2).
            return self._crashed(status.describe()) if step is Step.CRASH else self._complete()
        return self._stopped_elsewhere(newest[0], newest[1], step is Step.RESTART_NOW)

    def _stopped_elsewhere(
        self, step: int, manifest: layout.Manifest, progressed: bool
    ) -> int | None:
        """Exit 0 after a save that is not ``final``: an operator's ``kill``, a peer rank's
        stop. The run is not finished: commit what it saved (the background sync does),
        and start it again to resume. Not a crash, unless it got nowhere since its start:
        a command that keeps exiting 0 without training must not loop forever."""
        log.warning(
            "trainer_stopped_elsewhere",
            step=step,
            reason=manifest.reason,
            progressed=progressed,
            why="the trainer exited 0 after a save that is not final: someone else stopped it",
        )
        self.sync.wake()
        if not progressed:
            return self._crashed(f"exited 0 at step {step} ({manifest.reason}) without progress")
        self.state.update(child_pid=None)
        self._restart_at = time.monotonic()
        # Several nodes: a peer stopped us, and is committing its part of this step.
        self._start_rejoin(step)
        self.state.transition(Phase.BACKOFF, "trainer stopped elsewhere", backoff_s=0.0, step=step)
        return None

    def _start_rejoin(self, wait_for_step: int | None) -> None:
        """Several nodes: before the next start, align with the global commit (a thread)."""
        nodes = self.nodes
        if nodes is None:
            return

        def rejoin() -> None:
            nodes.rejoin(wait_for_step)

        self._rejoin = FlushHandle(rejoin, name="rejoin")

    def _complete(self) -> int:
        """The trainer finished the run: commit the ``final`` checkpoint, then complete.json."""
        self.state.update(child_pid=None)
        self.state.transition(Phase.UPLOADING, "training command finished")
        committed = self._await_flush(
            "run complete", wait_global_s=FINAL_COMMIT_WAIT_S if self.nodes else 0.0
        )
        newest = newest_local_checkpoint(self.cfg.checkpoints.local_dir)
        if newest is None:
            # The command honoured nothing of the checkpoint contract; a restart would only
            # train again from scratch, so this is a configuration error (exit 2).
            log.error(
                "final_checkpoint_missing",
                local_dir=str(self.cfg.checkpoints.local_dir),
                hint="the training command exited 0 without writing a checkpoint "
                "into $SPOT_CHECKPOINT_DIR",
            )
            self.state.transition(Phase.FAILED, "no checkpoint to commit")
            return 2
        newest_local = newest[0]
        if committed != newest_local:
            # The final checkpoint is on disk but not in the bucket (S3 down, throttled,
            # denied): exit 1, and systemd's restart commits it on the next boot.
            log.error("final_commit_failed", newest_local_step=newest_local, committed=committed)
            self.state.transition(Phase.FAILED, "final checkpoint not committed")
            self.notifier.stopping("failed")
            return 1
        write = lambda: self.store.write_complete(newest_local)  # noqa: E731
        marker = self.loop.off_loop(write, "complete.json")
        if marker.error is not None:
            log.error("complete_marker_failed", error=marker.error)
            self.state.transition(Phase.FAILED, "complete.json not written")
            self.notifier.stopping("failed")
            return 1
        log.info("run_completed", step=newest_local)
        if self.ledger is not None:
            self.ledger.stop(reason="complete", committed_step=newest_local)
        self._release_slot(newest_local)
        self.state.transition(Phase.DONE, "run complete", step=newest_local)
        self.notifier.stopping("done")
        return 0

    def _observe_progress(self) -> None:
        """A new step directory on the local disk is the trainer's progress.

        Read from the disk itself (one directory listing), the moment the checkpoint
        lands: not when a sync pass starts, which may be minutes later behind a slow
        upload, and would get a healthy trainer killed as hung.
        """
        local = layout.list_step_dirs(self.cfg.checkpoints.local_dir)
        step = local[0][0] if local else None
        if step is not None and (self._progress_step is None or step > self._progress_step):
            self._progress_step, self._progress_at = step, time.monotonic()
            if self._first_step_pending and self.ledger is not None:
                self._first_step_pending = False
                self.ledger.first_step(step=step)

    def _progress_overdue(self) -> float | None:
        """Seconds without a new checkpoint from the running trainer, once past
        ``daemon.progress_timeout`` (None while within it, or with the check off)."""
        limit = self.cfg.daemon.progress_timeout
        if not limit or self.child is None or self.state.phase is not Phase.TRAINING:
            return None
        quiet = time.monotonic() - self._progress_at
        return quiet if quiet >= limit else None

    def _hung(self, quiet: float) -> int | None:
        """A trainer alive but making no progress (a collective that never returns, a
        stuck data loader): kill its tree and treat it as a crash. It is not asked to
        save first: a hung loop reaches no step boundary, and its newest checkpoint is
        what a restart resumes from anyway."""
        assert self.child is not None
        log.error(
            "trainer_hung",
            pid=self.child.pid,
            seconds_without_checkpoint=round(quiet, 1),
            progress_timeout=self.cfg.daemon.progress_timeout,
            newest_local_step=self._progress_step,
        )
        self.child.kill_tree("no new checkpoint within daemon.progress_timeout")
        assert on_hang() is Step.CRASH
        return self._crashed(f"hung: no new checkpoint in {quiet:.0f}s")

    def _crashed(self, why: str) -> int | None:
        """A trainer that failed without our signal: restart with backoff, or give up."""
        now = time.monotonic()
        window = self.cfg.daemon.restart_window
        self._failures = [t for t in self._failures if now - t < window] + [now]
        self.state.update(child_pid=None)
        if len(self._failures) > self.cfg.daemon.max_restarts:
            return self._give_up(
                f"trainer failed {len(self._failures)} times in {window:g}s ({why})"
            )
        backoff = min(_MAX_BACKOFF, 2.0 ** (len(self._failures) - 1))
        self._restart_at = now + backoff
        self._start_rejoin(None)
        restarts = self.state.snapshot().restarts + 1
        self.state.update(restarts=restarts)
        self.state.transition(Phase.BACKOFF, f"trainer {why}", backoff_s=backoff, restarts=restarts)
        return None

    def _give_up(self, why: str) -> int:
        """Commit what is complete, then exit non-zero with a clear final event."""
        committed = self._await_flush("giving up")
        log.error("supervisor_gave_up", why=why, committed_step=committed)
        self.state.transition(Phase.FAILED, why)
        self.notifier.stopping("failed")
        return 1


def newest_local_checkpoint(local_dir: Path) -> tuple[int, layout.Manifest] | None:
    """The newest complete local checkpoint (sizes checked, not hashes) and its manifest."""
    for step, path in layout.list_step_dirs(local_dir):
        try:
            return step, layout.load_complete(path, hash_files=False)
        except (layout.ManifestError, OSError):
            continue
    return None


def _remove_quietly(path: Path) -> None:
    """Remove a stale file; a path we cannot remove is logged, never fatal."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("stale_file_not_removed", path=str(path), error=str(exc))
