"""The EC2 instance metadata paths, as AWS documents them (tokens are :mod:`.tokens`).

``spot/instance-action``, ``spot/termination-time`` and
``events/recommendations/rebalance`` are 404 until something is scheduled;
``events/maintenance/scheduled`` is ``[]`` until events are set. A directory answers
with its entries. The paths themselves are the client's (:mod:`daemon.notices.imds`),
named once.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
from collections.abc import Mapping, Sequence
from email.message import Message

import structlog

from daemon.notices import imds
from daemon.standins.emulator.server import Reply
from daemon.standins.emulator.times import as_utc, format_event_time, format_iso, utc_now
from daemon.standins.emulator.tokens import TokenStore

log = structlog.get_logger(__name__)

SPOT_ACTIONS = ("terminate", "stop", "hibernate")
"""The actions AWS documents for ``spot/instance-action``."""

DEFAULT_NOTICE_LEAD_S = 120.0
"""AWS warns two minutes ahead (except for hibernate, which starts at once)."""

IDENTITY_DOCUMENT_PATH = "/latest/dynamic/instance-identity/document"


def scheduled_event(
    code: str = "system-reboot",
    not_before: dt.datetime | None = None,
    *,
    duration: dt.timedelta = dt.timedelta(hours=2),
    state: str = "active",
    description: str | None = None,
    event_id: str | None = None,
) -> dict[str, str]:
    """One item of ``events/maintenance/scheduled`` in the form AWS documents."""
    start = not_before or (utc_now() + dt.timedelta(days=1))
    return {
        "NotBefore": format_event_time(start),
        "Code": code,
        "Description": description or f"scheduled {code}",
        "EventId": event_id or f"instance-event-{secrets.token_hex(9)[:17]}",
        "NotAfter": format_event_time(start + duration),
        "State": state,
    }


class AwsMetadata:
    """One EC2 instance's metadata: its identity, and the notices and events set on it."""

    def __init__(
        self,
        lock: threading.Lock,
        tokens: TokenStore,
        *,
        instance_id: str,
        instance_type: str,
        region: str,
        availability_zone: str,
    ) -> None:
        self._lock = lock
        self._tokens = tokens
        self._static: dict[str, str] = {
            imds.INSTANCE_ID_PATH: instance_id,
            imds.INSTANCE_TYPE_PATH: instance_type,
            imds.INSTANCE_LIFE_CYCLE_PATH: "spot",
            imds.REGION_PATH: region,
            imds.AVAILABILITY_ZONE_PATH: availability_zone,
        }
        # The instance identity document's pendingTime: when this "instance" launched.
        self._launched_at = utc_now()
        self._notice: tuple[str, dt.datetime] | None = None
        self._rebalance: dt.datetime | None = None
        self._scheduled: list[dict[str, str]] = []

    def set_notice(self, action: str = "terminate", time: dt.datetime | None = None) -> dt.datetime:
        """Publish a spot interruption notice (see :meth:`MetadataEmulator.set_notice`)."""
        if action not in SPOT_ACTIONS:
            raise ValueError(f"spot action {action!r} is not one of {', '.join(SPOT_ACTIONS)}")
        if time is None:
            lead = 0.0 if action == "hibernate" else DEFAULT_NOTICE_LEAD_S
            time = utc_now() + dt.timedelta(seconds=lead)
        when = as_utc(time).replace(microsecond=0)
        with self._lock:
            self._notice = (action, when)
        log.info("emulator_notice_set", action=action, time=format_iso(when))
        return when

    def clear_notice(self) -> None:
        """Withdraw the notice."""
        with self._lock:
            self._notice = None
        log.info("emulator_notice_cleared")

    def set_rebalance(self, notice_time: dt.datetime | None = None) -> dt.datetime:
        """Publish a rebalance recommendation (``noticeTime`` defaults to now)."""
        when = as_utc(notice_time or utc_now()).replace(microsecond=0)
        with self._lock:
            self._rebalance = when
        log.info("emulator_rebalance_set", notice_time=format_iso(when))
        return when

    def clear_rebalance(self) -> None:
        """Withdraw the rebalance recommendation."""
        with self._lock:
            self._rebalance = None

    def set_scheduled_events(self, events: Sequence[Mapping[str, str]]) -> None:
        """Replace the scheduled maintenance events."""
        copied = [dict(e) for e in events]
        with self._lock:
            self._scheduled = copied
        log.info("emulator_scheduled_events_set", count=len(copied))

    def launch(self, instance_id: str) -> None:
        """A new instance from now on: its own id, launched now."""
        with self._lock:
            self._static[imds.INSTANCE_ID_PATH] = instance_id
            self._launched_at = utc_now()

    def answer(self, method: str, path: str, headers: Message) -> Reply:
        """The answer to a request outside the control prefix."""
        if path == imds.TOKEN_PATH:
            return self._tokens.answer_put(method, headers)
        if not path.startswith("/latest/"):
            return Reply(404, b"Not Found")
        if not self._tokens.valid(headers.get(imds.TOKEN_HEADER)):
            # IMDSv2 required: no token, an unknown one or an expired one is 401, never v1.
            return Reply(401, b"Unauthorized")
        if method != "GET":
            return Reply(405, b"Method Not Allowed", headers=(("Allow", "GET"),))
        value = self._lookup(path)
        if value is None:
            return Reply(404, b"Not Found")
        return Reply(200, value.encode())

    def _identity_document(self) -> str:
        """``dynamic/instance-identity/document`` in the form AWS documents (the fields
        a supervisor reads; no signature)."""
        s = self._static
        return json.dumps(
            {
                "instanceId": s[imds.INSTANCE_ID_PATH],
                "instanceType": s[imds.INSTANCE_TYPE_PATH],
                "availabilityZone": s[imds.AVAILABILITY_ZONE_PATH],
                "region": s[imds.REGION_PATH],
                "pendingTime": format_iso(self._launched_at),
                "architecture": "x86_64",
                "imageId": "ami-0123456789abcdef0",
                "accountId": "123456789012",
                "version": "2017-09-30",
            },
            indent=2,
        )

    def _items(self) -> dict[str, str]:
        with self._lock:
            items = dict(self._static)
            items[IDENTITY_DOCUMENT_PATH] = self._identity_document()
            items[imds.SCHEDULED_EVENTS_PATH] = json.dumps(self._scheduled, indent=2)
            if self._notice is not None:
                action, when = self._notice
                # The documented form: {"action": "terminate", "time": "2017-09-18T08:22:00Z"}
                items[imds.INSTANCE_ACTION_PATH] = json.dumps(
                    {"action": action, "time": format_iso(when)}
                )
                if action == "terminate":
                    items[imds.TERMINATION_TIME_PATH] = format_iso(when)
            if self._rebalance is not None:
                items[imds.REBALANCE_PATH] = json.dumps({"noticeTime": format_iso(self._rebalance)})
        return items

    def _lookup(self, path: str) -> str | None:
        items = self._items()
        if path in items:
            return items[path]
        # A directory answers with its entries, one per line, sub-directories with a "/".
        prefix = path if path.endswith("/") else path + "/"
        if not prefix.startswith(imds.META_DATA_PREFIX):
            return None
        entries = set()
        for key in items:
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                head, sep, _ = rest.partition("/")
                entries.add(head + sep)
        return "\n".join(sorted(entries)) if entries else None
