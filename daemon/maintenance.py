"""Scheduled maintenance: which events stand, and when each needs its checkpoint.

A scheduled event (``instance-stop``, ``instance-retirement``, ``system-reboot``,
``instance-reboot``) does not drain anything: when it comes, it reaches us as the OS
shutdown (``systemctl stop``), which saves and commits again. Until then the instance
is healthy and may run for days, so all we do is ask for a checkpoint (SIGUSR1) in time
for it to be committed before ``NotBefore``: the lead a spot notice would give, plus the
upload reserve and the safety margin. An event that disappears or is cancelled changes
nothing; one moved to another time is acted on at its new time. Events are kept by their
``EventId`` (stable across a move).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon.notices import Notice, event_key

log = structlog.get_logger(__name__)

MAINTENANCE_LEAD_S = 120.0
"""A checkpoint is asked for this long before ``NotBefore`` (plus reserve and margin)."""


@dataclass
class Scheduled:
    """A scheduled maintenance event, and whether its checkpoint was asked for."""

    notice: Notice
    requested: bool = False


class MaintenanceSchedule:
    """The scheduled events that stand; ``due_in(notice)`` says how long until one needs
    its checkpoint (negative: now)."""

    def __init__(self, due_in: Callable[[Notice], float]) -> None:
        self._due_in = due_in
        self._events: dict[str, Scheduled] = {}

    def schedule(self, notice: Notice) -> None:
        """Remember an event (new, or moved to another time)."""
        key = event_key(notice)
        previous = self._events.get(key)
        if previous is not None and previous.notice.deadline == notice.deadline:
            return
        self._events[key] = Scheduled(notice)
        log.info(
            "maintenance_rescheduled" if previous is not None else "maintenance_scheduled",
            id=notice.id,
            event_id=key,
            action=notice.action,
            not_before=notice.deadline.isoformat(),
            act_in_s=round(self._due_in(notice), 1),
            **({"previous_not_before": previous.notice.deadline.isoformat()} if previous else {}),
        )

    def due(self, active: frozenset[str] | None) -> list[tuple[str, Scheduled]]:
        """Forget events no longer in ``active`` (the source's latest poll; None: unknown);
        the events whose checkpoint is due and not yet asked for."""
        due = []
        for key, sched in list(self._events.items()):
            if active is not None and key not in active:
                # Cancelled, completed, or withdrawn: it changes nothing (a checkpoint
                # already asked for is simply one more commit).
                del self._events[key]
                log.info(
                    "maintenance_cancelled",
                    event_id=key,
                    action=sched.notice.action,
                    not_before=sched.notice.deadline.isoformat(),
                    checkpoint_requested=sched.requested,
                )
            elif not sched.requested and self._due_in(sched.notice) <= 0:
                due.append((key, sched))
        return due

    @staticmethod
    def requested(key: str, sched: Scheduled, child_signalled: bool) -> None:
        """Record (and log) that the checkpoint for this event was asked for."""
        sched.requested = True
        left = (sched.notice.deadline - dt.datetime.now(dt.timezone.utc)).total_seconds()
        log.warning(
            "maintenance_checkpoint_requested",
            event_id=key,
            action=sched.notice.action,
            not_before=sched.notice.deadline.isoformat(),
            seconds_to_not_before=round(left, 1),
            child_signalled=child_signalled,
        )
