"""The Azure Instance Metadata Service mode (``provider="azure"``): Scheduled Events.

``/metadata/scheduledevents?api-version=...`` (400 without ``Metadata: true`` or an
api-version) answers ``{"DocumentIncarnation": N, "Events": [...]}``; a ``POST`` of
``{"StartRequests": [...]}`` approves events (recorded; the event turns ``Started``).
``/metadata/instance/compute/name`` and ``.../vmId`` answer as text.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Sequence
from email.message import Message
from typing import Any
from urllib.parse import parse_qs

import structlog

from daemon.standins.emulator.server import Reply, json_reply
from daemon.standins.emulator.times import rfc1123, utc_now

log = structlog.get_logger(__name__)

AZURE_EVENTS_PATH = "/metadata/scheduledevents"
AZURE_COMPUTE_PREFIX = "/metadata/instance/compute/"
AZURE_EVENT_TYPES = ("Preempt", "Terminate", "Reboot", "Redeploy", "Freeze")


def azure_event(
    event_type: str = "Preempt",
    not_before: dt.datetime | None = None,
    *,
    resources: Sequence[str] = ("vm-spot-0",),
    event_id: str | None = None,
    status: str = "Scheduled",
    source: str = "Platform",
    duration_s: int = -1,
    description: str | None = None,
) -> dict[str, Any]:
    """One Scheduled Events event in the form Azure documents (``NotBefore`` in RFC 1123)."""
    if event_type not in AZURE_EVENT_TYPES:
        raise ValueError(f"event type {event_type!r} is not one of {', '.join(AZURE_EVENT_TYPES)}")
    if not_before is None:
        lead = 30.0 if event_type == "Preempt" else 900.0
        not_before = utc_now() + dt.timedelta(seconds=lead)
    return {
        "EventId": event_id or str(uuid.uuid4()).upper(),
        "EventStatus": status,
        "EventType": event_type,
        "ResourceType": "VirtualMachine",
        "Resources": list(resources),
        "NotBefore": rfc1123(not_before),
        "Description": description or f"{event_type} scheduled by the emulator",
        "EventSource": source,
        "DurationInSeconds": duration_s,
    }


class AzureScheduledEvents:
    """One VM's scheduled events, their incarnation number, and the approvals received."""

    def __init__(self, lock: threading.Lock, vm_name: str) -> None:
        self._lock = lock
        self._vm_name = vm_name
        self._events: list[dict[str, Any]] = []
        self._incarnation = 1
        self._approvals: list[str] = []

    def add(self, event_type: str, not_before: dt.datetime | None, **spec: Any) -> dict[str, Any]:
        """Add one event for this VM (``resources`` default to its name); returns it."""
        spec.setdefault("resources", [self._vm_name])
        event = azure_event(event_type, not_before, **spec)
        with self._lock:
            self._events.append(event)
            self._incarnation += 1
        log.info("emulator_azure_event_set", **{k: v for k, v in event.items() if k != "Resources"})
        return event

    def clear(self) -> None:
        """No events (as after they completed)."""
        with self._lock:
            self._events.clear()
            self._incarnation += 1

    def approvals(self) -> list[str]:
        """The EventIds approved with StartRequests, in order."""
        with self._lock:
            return list(self._approvals)

    def answer(self, method: str, path: str, query: str, headers: Message, body: bytes) -> Reply:
        """The answer to a request outside the control prefix."""
        if headers.get("Metadata") != "true" or headers.get("X-Forwarded-For"):
            return json_reply(400, {"error": "Bad request. Required metadata header not specified"})
        params = parse_qs(query)
        if "api-version" not in params:
            return json_reply(400, {"error": "Bad request. api-version was not specified"})
        if path.startswith(AZURE_COMPUTE_PREFIX) and method == "GET":
            item = path[len(AZURE_COMPUTE_PREFIX) :]
            values = {
                "name": self._vm_name,
                "vmId": "02aab8a4-74ef-476e-8182-f6d2ba4166a6",
                "vmSize": "Standard_NC24ads_A100_v4",
                "location": "eastus",
                "zone": "1",
                "priority": "Spot",
            }
            if item not in values:
                return json_reply(404, {"error": "Not found"})
            return Reply(200, values[item].encode())
        if path != AZURE_EVENTS_PATH:
            return json_reply(404, {"error": "Not found"})
        if method == "GET":
            with self._lock:
                doc = {
                    "DocumentIncarnation": self._incarnation,
                    "Events": [dict(e) for e in self._events],
                }
            return json_reply(200, doc)
        if method == "POST":
            return self._approve(body)
        return json_reply(405, {"error": "Method not allowed"})

    def _approve(self, body: bytes) -> Reply:
        try:
            starts = json.loads(body)["StartRequests"]
            ids = [str(s["EventId"]) for s in starts]
        except (ValueError, KeyError, TypeError):
            return json_reply(400, {"error": "Bad request. StartRequests expected"})
        with self._lock:
            for event in self._events:
                if event["EventId"] in ids:
                    event["EventStatus"] = "Started"
            self._approvals.extend(ids)
            self._incarnation += 1
        log.info("emulator_azure_events_approved", event_ids=ids)
        return Reply(200, b"")
