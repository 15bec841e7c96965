"""The drain: from a notice (or our own stop) to the emergency commit.

In order: plan the drain clock (:mod:`daemon.deadline`), write the notice file, SIGTERM
the trainer, stage the emergency checkpoint's files as they land; when the trainer is
gone (or killed at the drain deadline), the final flush commits it in a thread of its
own while the main loop keeps the clock. At the cancel deadline (the notice's time less
the safety margin) every upload still running is cancelled and its multipart upload
aborted: the newest committed checkpoint then stands, and nothing is ever half
committed.

The notice file's ``deadline`` is the drain deadline, when the trainer's tree is killed
(CONTRACT §3), not the instance's time (``instance_deadline``): the trainer's "is there
time left to save?" check must use the clock it is held to. A failure to write it is
logged and never stops the SIGTERM.

:class:`Drainer` does it for the supervisor: :meth:`~Drainer.begin` when the loop sees a
notice or a stop that means drain, :meth:`~Drainer.finish` when the trainer is gone.
Whether to drain at all is :mod:`daemon.policy`'s; whether an emergency upload can
finish in time is :mod:`daemon.budget`'s.
"""

from __future__ import annotations

import datetime as dt
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from daemon import layout
from daemon.budget import emergency_decision, log_emergency_decision
from daemon.child import TrainerProcess
from daemon.deadline import DrainPlan, ThroughputEstimate, plan_drain, wall_to_monotonic
from daemon.ending import Ending
from daemon.ledger import RunLedger
from daemon.loop import MainLoop
from daemon.notices import format_utc
from daemon.notices.sources import NoticeSources
from daemon.policy import exit_code_after_drain
from daemon.progress import newest_local_bytes
from daemon.sdnotify import Notifier
from daemon.state import Phase, StateMachine, write_json_atomic
from daemon.storage.sync import CheckpointSync, FlushHandle

if TYPE_CHECKING:
    from daemon.config import Config

log = structlog.get_logger(__name__)

TICK_S = 0.05
"""How closely a drain watches its clock and the trainer's exit."""


@dataclass(frozen=True)
class Drain:
    """Why we are draining and until when."""

    action: str
    source: str
    deadline_wall: dt.datetime
    plan: DrainPlan


def plan_for(
    action: str,
    source: str,
    deadline_wall: dt.datetime,
    *,
    safety_margin: float,
    reserve_bytes: int,
    throughput: ThroughputEstimate,
) -> Drain:
    """Work back from the notice's time to the drain and cancel deadlines."""
    plan = plan_drain(wall_to_monotonic(deadline_wall), safety_margin, reserve_bytes, throughput)
    return Drain(action, source, deadline_wall, plan)


def write_notice_file(path: Path, drain: Drain) -> None:
    """The trainer's notice file; a failure is logged and never stops the SIGTERM."""
    left = drain.plan.seconds_left()
    drain_wall = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=left)
    doc = {
        "action": drain.action,
        "deadline": format_utc(drain_wall),
        "source": drain.source,
        "instance_deadline": format_utc(drain.deadline_wall),
    }
    try:
        write_json_atomic(path, doc)
    except OSError as exc:
        # A read-only or full runtime dir: the trainer still gets SIGTERM and saves;
        # it only cannot see the deadline (it then saves without skipping).
        log.error(
            "notice_file_unwritable",
            path=str(path),
            error=str(exc),
            consequence="SIGTERM is sent anyway; the trainer sees no deadline",
        )


def emergency_commit(
    drain: Drain,
    sync: CheckpointSync,
    loop: MainLoop,
    local_dir: Path,
    *,
    several_nodes: bool,
    skipped: FlushHandle | None = None,
) -> tuple[int | None, dict[str, Any], FlushHandle]:
    """The final flush, watched against the cancel deadline: the committed step, the
    fields of the ``emergency_committed`` / ``emergency_not_committed`` event (logged), and
    the flush itself (still running if it got stuck past the deadline)."""
    plan = drain.plan
    # Several nodes: the peers' parts may still be on their way; wait for them until the
    # cancel deadline (the cancel switch ends the wait).
    wait = max(plan.cancel_in(), 0.0) if several_nodes else 0.0
    # Skipped (daemon.budget): no emergency upload, only the sync's stop.
    flush = skipped if skipped is not None else sync.flush_async(wait)
    cancelled_at: float | None = None
    while not flush.done.is_set():
        loop.ping_watchdog()
        now = time.monotonic()
        if cancelled_at is None and plan.cancel_in(now) <= 0:
            cancelled_at = now
            transfers = sync.cancel("notice deadline less the safety margin")
            fields_now = plan.as_fields(now)
            log.warning("upload_cancel_deadline_reached", transfers=transfers, **fields_now)
        if cancelled_at is not None and now >= max(plan.notice_deadline, cancelled_at + 1.0):
            # The flush did not return even after the cancel: the machine goes anyway.
            log.error("emergency_flush_stuck", seconds_since_cancel=round(now - cancelled_at, 3))
            break
        flush.done.wait(TICK_S)
    committed = flush.committed if flush.done.is_set() else sync.stats.newest_committed_step
    left = plan.notice_deadline - time.monotonic()
    local = layout.list_step_dirs(local_dir)
    newest_local = local[0][0] if local else None
    fields: dict[str, Any] = {
        "committed_step": committed,
        "newest_local_step": newest_local,
        "seconds_before_deadline": round(left, 3),
        "uploads_cancelled": cancelled_at is not None,
        "bytes_staged": sync.stager.bytes_staged,
        "action": drain.action,
    }
    if flush.error is not None:
        fields["error"] = flush.error
    if committed is not None and committed == newest_local and left >= 0:
        log.info("emergency_committed", **fields)
    else:
        log.warning("emergency_not_committed", **fields)
    return committed, fields, flush


class Drainer:
    """Carries a notice (or our own stop) into the trainer and through the emergency
    commit, for one supervisor; made once a slot is held (a drain ends by releasing it)."""

    def __init__(
        self,
        cfg: Config,
        sources: NoticeSources,
        throughput: ThroughputEstimate,
        ending: Ending,
        ledger: RunLedger,
        *,
        sync: CheckpointSync,
        state: StateMachine,
        notifier: Notifier,
        loop: MainLoop,
        several_nodes: bool,
    ) -> None:
        self._cfg, self._sources, self._throughput = cfg, sources, throughput
        self._ending, self._ledger = ending, ledger
        self._sync, self._state, self._notifier, self._loop = sync, state, notifier, loop
        self._several_nodes = several_nodes
        self._skipped: FlushHandle | None = None

    def begin(
        self,
        action: str,
        source: str,
        deadline_wall: dt.datetime,
        child: TrainerProcess | None,
    ) -> Drain:
        """In order: plan the drain, write the notice file, SIGTERM the trainer, stage the
        emergency checkpoint's files as they land (threads only: no S3 I/O here)."""
        cfg, throughput = self._cfg, self._throughput
        drain = plan_for(
            action,
            source,
            deadline_wall,
            safety_margin=cfg.daemon.safety_margin,
            reserve_bytes=newest_local_bytes(cfg.checkpoints.local_dir),
            throughput=throughput,
        )
        write_notice_file(cfg.notice_file, drain)
        signalled = child.send(signal.SIGTERM) if child else False
        decision = emergency_decision(
            cfg.imds.provider,
            self._sources.notice_s,
            drain.plan.reserve_bytes,
            throughput.bytes_per_second,
            throughput.measured,
            drain.plan.cancel_in(),
        )
        log_emergency_decision(decision)
        if decision.commit:
            self._sync.begin_emergency()
        else:
            # Start no upload that cannot finish: the sync completes the commit it is
            # sending (a periodic one may still make it) and takes nothing new.
            sync = self._sync

            def finish_in_flight() -> int | None:
                sync.stop()
                return sync.stats.newest_committed_step

            self._skipped = FlushHandle(finish_in_flight, name="sync-stop")
        self._state.update(drain_deadline=deadline_wall.isoformat())
        self._notifier.extend_timeout(max(drain.plan.notice_deadline - time.monotonic(), 0) + 30)
        self._state.transition(
            Phase.DRAINING,
            f"{action} from {source}",
            deadline=deadline_wall.isoformat(),
            child_signalled=signalled,
            **drain.plan.as_fields(),
        )
        return drain

    def finish(self, drain: Drain, child: TrainerProcess | None) -> int:
        """The emergency commit, then the slot, then an orderly exit: the exit code."""
        if child is not None:
            child.kill_leftovers()
        self._state.update(child_pid=None)
        self._state.transition(Phase.UPLOADING, "emergency commit", **drain.plan.as_fields())
        committed, fields, flush = emergency_commit(
            drain,
            self._sync,
            self._loop,
            self._cfg.checkpoints.local_dir,
            several_nodes=self._several_nodes,
            skipped=self._skipped,
        )
        self._ending.track_flush(flush)
        # Azure: approve the Preempt/Terminate event now, never before the commit.
        newest_in_storage = committed is not None and committed == fields.get("newest_local_step")
        self._loop.off_loop(
            lambda: self._sources.after_emergency_commit(newest_in_storage), "event-approval"
        )
        # The slot is free for a standby (or a replacement) only now, after the commit.
        self._ending.release_slot(committed)
        self._ledger.stop(
            reason=drain.action,
            committed_step=committed,
            local_step=fields.get("newest_local_step"),
        )
        self._ending.done("shut down in order", **fields)
        return exit_code_after_drain(drain.source, self._cfg.daemon.exit_code_after_notice)
