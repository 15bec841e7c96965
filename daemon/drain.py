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
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon import layout
from daemon.deadline import DrainPlan, ThroughputEstimate, plan_drain, wall_to_monotonic
from daemon.loop import MainLoop
from daemon.notices import format_utc
from daemon.state import write_json_atomic
from daemon.storage.sync import CheckpointSync, FlushHandle

log = structlog.get_logger(__name__)

_TICK = 0.05


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
    plan = plan_drain(
        wall_to_monotonic(deadline_wall), safety_margin, reserve_bytes, throughput
    )
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
        flush.done.wait(_TICK)
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
