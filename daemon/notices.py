"""Notices that the instance is going away, and the sources that find them.

Every source produces the one :class:`Notice` type behind the two-member
:class:`NoticeSource` interface (``name``, ``poll()``), so another cloud is one more
source class. The AWS sources read the instance metadata service through
:class:`~daemon.imds.ImdsClient`, one HTTP request per poll:

* :class:`AwsSpotSource`: ``spot/instance-action``, the spot interruption notice.
* :class:`AwsRebalanceSource`: ``events/recommendations/rebalance``, an early hint
  that the instance is at elevated risk of interruption.
* :class:`AwsMaintenanceSource`: ``events/maintenance/scheduled``, stops, reboots and
  retirements AWS has scheduled.

A notice's ``id`` is a hash of what the cloud said (source, kind, action, time as
given), so polling the same notice again yields the same id and the watcher delivers
it once.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog

from daemon.imds import (
    INSTANCE_ACTION_PATH,
    REBALANCE_PATH,
    SCHEDULED_EVENTS_PATH,
    ImdsClient,
    MetadataUnavailable,
)

log = structlog.get_logger(__name__)

NoticeKind = Literal["interruption", "rebalance", "maintenance"]

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

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    """Now, as an aware UTC datetime."""
    return dt.datetime.now(dt.timezone.utc)


def format_utc(t: dt.datetime) -> str:
    """ISO 8601 UTC with a ``Z``, second precision (the notice file's form)."""
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def notice_id(source: str, kind: str, action: str, when: str) -> str:
    """A stable id: the same notice polled twice hashes the same."""
    digest = hashlib.sha256(f"{source}\x00{kind}\x00{action}\x00{when}".encode()).hexdigest()
    return digest[:16]


@dataclass(frozen=True)
class Notice:
    """A warning that the instance (and so the trainer) is going away.

    ``deadline`` is when the cloud acts (aware UTC); a notice that gives no usable
    time, or a past one, gets "now": act at once. ``raw`` is what the cloud sent,
    parsed, for the logs; it takes no part in equality.
    """

    id: str
    kind: NoticeKind
    action: str
    deadline: dt.datetime
    source: str
    raw: Any = field(default=None, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for state.json and events."""
        return {
            "id": self.id,
            "kind": self.kind,
            "action": self.action,
            "deadline": format_utc(self.deadline),
            "source": self.source,
        }

    def notice_file_payload(self) -> dict[str, str]:
        """What the supervisor writes to ``$SPOT_NOTICE_FILE`` (CONTRACT §3)."""
        return {"action": self.action, "deadline": format_utc(self.deadline), "source": self.source}


class NoticeSource(Protocol):
    """Where notices come from. ``poll()`` returns the notices present now (often none).

    ``poll`` raises :class:`~daemon.imds.MetadataUnavailable` when it cannot tell:
    the service did not answer, or answered something that does not parse. An empty
    list means "asked, and there is nothing".
    """

    name: str

    def poll(self) -> list[Notice]: ...


def parse_iso_utc(value: str) -> dt.datetime | None:
    """``2026-11-28T09:02:00Z`` (or with an offset) as aware UTC; None if unparseable."""
    try:
        t = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)  # AWS times are UTC
    return t.astimezone(dt.timezone.utc)


def parse_event_time(value: str) -> dt.datetime | None:
    """``21 Jan 2019 09:00:43 GMT`` (scheduled events) as aware UTC; None if unparseable."""
    try:
        t = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc)


def _deadline(when: dt.datetime | None, now: dt.datetime) -> dt.datetime:
    # No usable time, or one already past: the cloud is acting now.
    return now if when is None or when < now else when


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
    deadline = now if action == "hibernate" else _deadline(when, now)
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
                    deadline=_deadline(when, now),
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


__all__ = [
    "AWS_IMDS_SOURCE",
    "INTERRUPTING_EVENT_CODES",
    "AwsMaintenanceSource",
    "AwsRebalanceSource",
    "AwsSpotSource",
    "Notice",
    "NoticeKind",
    "NoticeSource",
    "event_key",
    "format_utc",
    "notice_id",
    "parse_event_time",
    "parse_instance_action",
    "parse_iso_utc",
    "utc_now",
]
