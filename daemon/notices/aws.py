"""The AWS sources: the EC2 instance metadata service, one HTTP request per poll
through :class:`~daemon.notices.imds.ImdsClient`:

* :class:`AwsSpotSource`: ``spot/instance-action``, the spot interruption notice.
* :class:`AwsRebalanceSource`: ``events/recommendations/rebalance``, an early hint
  that the instance is at elevated risk of interruption.
* :class:`AwsMaintenanceSource`: ``events/maintenance/scheduled``, stops, reboots and
  retirements AWS has scheduled.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from typing import Any

import structlog

from daemon.notices.base import Clock, Notice, deadline_or_now, notice_id, parse_iso_utc, utc_now
from daemon.notices.imds import (
    INSTANCE_ACTION_PATH,
    REBALANCE_PATH,
    SCHEDULED_EVENTS_PATH,
    ImdsClient,
    MetadataUnavailable,
)

log = structlog.get_logger(__name__)

AWS_IMDS_SOURCE = "aws-imds"
"""``Notice.source`` of everything read from the EC2 metadata service."""

SPOT_ACTIONS = ("terminate", "stop", "hibernate")
INTERRUPTING_EVENT_CODES = frozenset(
    {"instance-stop", "instance-retirement", "instance-reboot", "system-reboot"}
)
"""Scheduled event codes that stop or restart the instance (and so the trainer).

``system-maintenance`` is left out: AWS does network or power work without stopping it.
"""

FINISHED_EVENT_STATES = frozenset({"completed", "canceled"})


def parse_event_time(value: str) -> dt.datetime | None:
    """``21 Jan 2019 09:00:43 GMT`` (scheduled events) as aware UTC; None if unparseable."""
    try:
        t = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc)


class AwsSpotSource:
    """The spot interruption notice, ``spot/instance-action``: one GET per poll.

    404 means no notice. A 200 body is ``{"action": "terminate", "time": "...Z"}``;
    ``hibernate`` has no two-minute warning, so its deadline is now.
    """

    name = "aws-spot"

    def __init__(self, client: ImdsClient, *, clock: Clock = utc_now) -> None:
        self.client = client
        self._clock = clock

    def poll(self) -> list[Notice]:
        """The interruption notice, if one is published."""
        doc = self.client.get_json(INSTANCE_ACTION_PATH)
        if doc is None:
            return []  # 404 is normal here: no notice yet
        return [parse_instance_action(doc, now=self._clock())]


def parse_instance_action(doc: Any, *, now: dt.datetime) -> Notice:
    """Turn a parsed ``instance-action`` body into a Notice (MetadataUnavailable if not one)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("action"), str) or not doc["action"]:
        raise MetadataUnavailable(
            INSTANCE_ACTION_PATH, f"body has no action: {str(doc)[:80]!r}", status=200
        )
    action = doc["action"]
    raw_time = doc.get("time")
    when_text = raw_time if isinstance(raw_time, str) else ""
    when = parse_iso_utc(when_text) if when_text else None
    if when is None:
        log.warning("notice_time_unparseable", path=INSTANCE_ACTION_PATH, time=raw_time)
    if action not in SPOT_ACTIONS:
        # A new action AWS added later is still an interruption: act on it.
        log.warning("notice_action_unknown", action=action)
    deadline = now if action == "hibernate" else deadline_or_now(when, now)
    return Notice(
        id=notice_id(AWS_IMDS_SOURCE, "interruption", action, when_text),
        kind="interruption",
        action=action,
        deadline=deadline,
        source=AWS_IMDS_SOURCE,
        raw=doc,
    )


class AwsRebalanceSource:
    """The rebalance recommendation, ``events/recommendations/rebalance``.

    It has no deadline of its own (the instance may run for hours yet): the notice's
    deadline is its ``noticeTime``, i.e. "now-ish", a prompt to checkpoint early.
    """

    name = "aws-rebalance"

    def __init__(self, client: ImdsClient, *, clock: Clock = utc_now) -> None:
        self.client = client
        self._clock = clock

    def poll(self) -> list[Notice]:
        """The recommendation, if one is published."""
        doc = self.client.get_json(REBALANCE_PATH)
        if doc is None:
            return []  # 404 is normal here: no recommendation
        if not isinstance(doc, dict) or not isinstance(doc.get("noticeTime"), str):
            raise MetadataUnavailable(
                REBALANCE_PATH, f"body has no noticeTime: {str(doc)[:80]!r}", status=200
            )
        when_text: str = doc["noticeTime"]
        when = parse_iso_utc(when_text)
        return [
            Notice(
                id=notice_id(AWS_IMDS_SOURCE, "rebalance", "rebalance", when_text),
                kind="rebalance",
                action="rebalance",
                deadline=when or self._clock(),
                source=AWS_IMDS_SOURCE,
                raw=doc,
            )
        ]


class AwsMaintenanceSource:
    """Scheduled maintenance, ``events/maintenance/scheduled``: a JSON list of events.

    Only events that stop or restart the instance count (:data:`INTERRUPTING_EVENT_CODES`),
    and only while not completed or canceled; the deadline is ``NotBefore``.

    The watcher delivers each notice once; whether an event still stands is a question
    about *now*, answered by :meth:`active_event_ids` from the latest successful poll
    (an event that was cancelled, completed or withdrawn is no longer in it).
    """

    name = "aws-maintenance"

    def __init__(self, client: ImdsClient, *, clock: Clock = utc_now) -> None:
        self.client = client
        self._clock = clock
        self._active: frozenset[str] | None = None

    def active_event_ids(self) -> frozenset[str] | None:
        """EventIds of the interrupting events in the latest successful poll (None: none
        succeeded yet, so nothing is known to be gone)."""
        return self._active

    def poll(self) -> list[Notice]:
        """Every interrupting event that is still ahead or under way."""
        doc = self.client.get_json(SCHEDULED_EVENTS_PATH)
        if doc is None:
            self._active = frozenset()
            return []  # AWS answers "[]"; a 404 is read the same way
        if not isinstance(doc, list):
            raise MetadataUnavailable(
                SCHEDULED_EVENTS_PATH, f"body is not a list: {str(doc)[:80]!r}", status=200
            )
        now = self._clock()
        notices = []
        for event in doc:
            if not isinstance(event, dict):
                raise MetadataUnavailable(
                    SCHEDULED_EVENTS_PATH,
                    f"event is not an object: {str(event)[:80]!r}",
                    status=200,
                )
            code = event.get("Code")
            state = str(event.get("State", "active")).lower()
            if code not in INTERRUPTING_EVENT_CODES or state in FINISHED_EVENT_STATES:
                continue
            not_before = str(event.get("NotBefore", ""))
            when = parse_event_time(not_before)
            if when is None:
                log.warning("notice_time_unparseable", path=SCHEDULED_EVENTS_PATH, time=not_before)
            key = f"{event.get('EventId', '')}|{not_before}"
            notices.append(
                Notice(
                    id=notice_id(AWS_IMDS_SOURCE, "maintenance", str(code), key),
                    kind="maintenance",
                    action=str(code),
                    deadline=deadline_or_now(when, now),
                    source=AWS_IMDS_SOURCE,
                    raw=event,
                )
            )
        self._active = frozenset(event_key(n) for n in notices)
        return notices


def event_key(notice: Notice) -> str:
    """A scheduled event's own ``EventId`` (stable when AWS moves it to another time);
    the notice's id for an event that has none."""
    raw = notice.raw if isinstance(notice.raw, dict) else {}
    return str(raw.get("EventId") or notice.id)
