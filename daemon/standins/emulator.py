"""A local EC2 instance metadata service (IMDSv2 only), for the demo and the tests.

Nothing here runs in production. It answers as AWS documents the service:

* ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds: 1..21600``
  returns an opaque token (400 without a valid TTL; 403 when the PUT carries
  ``X-Forwarded-For``, which AWS refuses so a proxy on the instance cannot mint tokens).
* Every metadata ``GET`` needs a live token in ``X-aws-ec2-metadata-token``, else 401:
  the instance requires IMDSv2, there is no v1 fallback.
* ``spot/instance-action``, ``spot/termination-time`` and
  ``events/recommendations/rebalance`` are 404 until something is scheduled;
  ``events/maintenance/scheduled`` is ``[]`` until events are set.

Tests and the demo drive it through Python methods (:meth:`MetadataEmulator.set_notice`,
:meth:`~MetadataEmulator.add_fault`, ...) or, from another process, over HTTP on
``/_emulator/...``, a prefix AWS never uses (see :class:`EmulatorControl`). Faults make
it answer 5xx/429, stall, hang up, or serve a broken body, for the next N requests on a
path prefix. ``stats()`` counts requests per method and path, tokens issued and
connections accepted, so a test can assert how many requests a client made.

Other clouds (``MetadataEmulator(provider="gcp" | "azure")``; AWS, the default, is
exactly as above):

* ``gcp``: the GCE metadata server under ``/computeMetadata/v1/``. Every request needs
  ``Metadata-Flavor: Google`` (403 without, or with ``X-Forwarded-For``); answers carry
  ``Metadata-Flavor: Google`` and an ``ETag`` (a hash of the value). ``instance/preempted``
  is ``FALSE`` until :meth:`MetadataEmulator.set_preempted`; ``instance/maintenance-event``
  is ``NONE`` until :meth:`~MetadataEmulator.set_maintenance_event`.
  ``?wait_for_change=true`` hangs until the value changes or ``timeout_sec`` passes, and
  answers at once when ``last_etag`` is not the current ETag, as GCE does.
* ``azure``: the Instance Metadata Service's Scheduled Events,
  ``/metadata/scheduledevents?api-version=...`` (400 without ``Metadata: true`` or an
  api-version), ``{"DocumentIncarnation": N, "Events": [...]}``; events are set with
  :meth:`~MetadataEmulator.set_azure_event`; a ``POST`` of ``{"StartRequests": [...]}``
  approves them (recorded: :meth:`~MetadataEmulator.azure_approvals`; the event turns
  ``Started``). ``/metadata/instance/compute/name`` and ``.../vmId`` answer as text.

The fault kind ``etag`` answers normally but with a wrong ``ETag`` (GCP).

Run standalone: ``python -m daemon.standins.emulator --port 8169`` prints its URL
(``--provider gcp|azure`` for the other clouds).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import email.utils
import hashlib
import http.client
import json
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import structlog

from daemon.log import configure as configure_logging
from daemon.notices.imds import (
    AVAILABILITY_ZONE_PATH,
    INSTANCE_ACTION_PATH,
    INSTANCE_ID_PATH,
    INSTANCE_LIFE_CYCLE_PATH,
    INSTANCE_TYPE_PATH,
    MAX_TOKEN_TTL,
    META_DATA_PREFIX,
    MIN_TOKEN_TTL,
    REBALANCE_PATH,
    REGION_PATH,
    SCHEDULED_EVENTS_PATH,
    TERMINATION_TIME_PATH,
    TOKEN_HEADER,
    TOKEN_PATH,
    TOKEN_TTL_HEADER,
)

log = structlog.get_logger(__name__)

CONTROL_PREFIX = "/_emulator/"
CONTROL_NOTICE_PATH = "/_emulator/notice"
CONTROL_REBALANCE_PATH = "/_emulator/rebalance"
CONTROL_SCHEDULED_PATH = "/_emulator/scheduled-events"
CONTROL_FAULT_PATH = "/_emulator/fault"
CONTROL_TOKENS_EXPIRE_PATH = "/_emulator/tokens/expire"
CONTROL_STATS_PATH = "/_emulator/stats"

SPOT_ACTIONS = ("terminate", "stop", "hibernate")
"""The actions AWS documents for ``spot/instance-action``."""

FAULT_KINDS = ("status", "delay", "close", "malformed", "etag")
PROVIDERS = ("aws", "gcp", "azure")
GCP_PREFIX = "/computeMetadata/v1/"
GCP_PREEMPTED = GCP_PREFIX + "instance/preempted"
GCP_MAINTENANCE_EVENT = GCP_PREFIX + "instance/maintenance-event"
GCP_DEFAULT_HANG_S = 300.0
AZURE_EVENTS_PATH = "/metadata/scheduledevents"
AZURE_COMPUTE_PREFIX = "/metadata/instance/compute/"
AZURE_EVENT_TYPES = ("Preempt", "Terminate", "Reboot", "Redeploy", "Freeze")
CONTROL_GCP_PATH = "/_emulator/gcp"
CONTROL_AZURE_EVENTS_PATH = "/_emulator/azure/events"
CONTROL_AZURE_APPROVALS_PATH = "/_emulator/azure/approvals"
DEFAULT_NOTICE_LEAD_S = 120.0
"""AWS warns two minutes ahead (except for hibernate, which starts at once)."""

DEFAULT_MALFORMED_BODY = '{"action": "terminate", "time": "2026-11-28T09:0'
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_iso(t: dt.datetime) -> str:
    """``2026-11-28T09:02:00Z``: the form of ``instance-action``'s ``time``."""
    return _as_utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_event_time(t: dt.datetime) -> str:
    """``21 Jan 2019 09:00:43 GMT``: the form of scheduled events' ``NotBefore``.

    Month names are spelled out here rather than with ``%b``, which follows the locale.
    """
    u = _as_utc(t)
    return f"{u.day} {_MONTHS[u.month - 1]} {u.year} {u:%H:%M:%S} GMT"


def _rfc1123(t: dt.datetime) -> str:
    """``Mon, 19 Sep 2016 18:29:47 GMT``: the form of Azure's ``NotBefore``."""
    return email.utils.format_datetime(_as_utc(t), usegmt=True)


def _as_utc(t: dt.datetime) -> dt.datetime:
    if t.tzinfo is None:
        raise ValueError(f"{t!r} is a naive datetime; give an aware one (UTC)")
    return t.astimezone(dt.timezone.utc)


IDENTITY_DOCUMENT_PATH = "/latest/dynamic/instance-identity/document"


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _parse_iso(value: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


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
    start = not_before or (_utc_now() + dt.timedelta(days=1))
    return {
        "NotBefore": format_event_time(start),
        "Code": code,
        "Description": description or f"scheduled {code}",
        "EventId": event_id or f"instance-event-{secrets.token_hex(9)[:17]}",
        "NotAfter": format_event_time(start + duration),
        "State": state,
    }


@dataclass
class Fault:
    """A misbehaviour for requests whose path starts with ``path_prefix``.

    ``kind``: ``status`` answers ``status`` with a short text body; ``delay`` answers
    normally after ``delay_s``; ``close`` hangs up without answering; ``malformed``
    answers 200 with ``body``; ``etag`` answers normally with a wrong ``ETag`` header.
    Any kind waits ``delay_s`` first. ``count`` is how many matching requests it still
    applies to (None: until cleared). ``method`` limits it to one HTTP method (None: any).
    """

    kind: str
    path_prefix: str = "/latest/"
    method: str | None = None
    count: int | None = None
    status: int = 503
    delay_s: float = 0.0
    body: str = DEFAULT_MALFORMED_BODY

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r} is not one of {', '.join(FAULT_KINDS)}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"fault count {self.count} must be at least 1 (or None)")
        if self.delay_s < 0:
            raise ValueError("fault delay_s must not be negative")
        if not 100 <= self.status <= 599:
            raise ValueError(f"fault status {self.status} is not an HTTP status")
        if self.method is not None:
            self.method = self.method.upper()

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault applies to a request."""
        return path.startswith(self.path_prefix) and self.method in (None, method)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as accepted by ``POST /_emulator/fault``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Fault:
        """Build a fault from the JSON body of ``POST /_emulator/fault``."""
        known = {"kind", "path_prefix", "method", "count", "status", "delay_s", "body"}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown fault keys: {', '.join(sorted(unknown))}")
        if "kind" not in doc:
            raise ValueError("fault needs a kind")
        return cls(**dict(doc))


@dataclass
class EmulatorStats:
    """Counters since start (or the last reset). ``requests`` keys are ``"GET /path"``.

    Control requests (``/_emulator/...``) are not counted.
    """

    requests: dict[str, int] = field(default_factory=dict)
    responses: dict[str, int] = field(default_factory=dict)
    tokens_issued: int = 0
    connections: int = 0
    faults_applied: int = 0

    @property
    def total(self) -> int:
        """All counted requests."""
        return sum(self.requests.values())

    @property
    def token_puts(self) -> int:
        """Requests for a token, answered or not."""
        return self.count("PUT", TOKEN_PATH)

    def count(self, method: str, path: str) -> int:
        """Requests seen for one method and path."""
        return self.requests.get(f"{method.upper()} {path}", 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as served by ``GET /_emulator/stats``."""
        doc = asdict(self)
        doc["total"] = self.total
        doc["token_puts"] = self.token_puts
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> EmulatorStats:
        """Parse the JSON of ``GET /_emulator/stats``."""
        return cls(
            requests=dict(doc["requests"]),
            responses=dict(doc["responses"]),
            tokens_issued=int(doc["tokens_issued"]),
            connections=int(doc["connections"]),
            faults_applied=int(doc["faults_applied"]),
        )


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


# A handler's answer that is no answer: hang up (the emulator is stopping).
_HANG_UP = _Reply(0)


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
        not_before = _utc_now() + dt.timedelta(seconds=lead)
    return {
        "EventId": event_id or str(uuid.uuid4()).upper(),
        "EventStatus": status,
        "EventType": event_type,
        "ResourceType": "VirtualMachine",
        "Resources": list(resources),
        "NotBefore": _rfc1123(not_before),
        "Description": description or f"{event_type} scheduled by the emulator",
        "EventSource": source,
        "DurationInSeconds": duration_s,
    }


class _ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class MetadataEmulator:
    """An IMDSv2 server on ``host:port`` (port 0: a free one), with a control API.

    ``start()`` / ``stop()`` or ``with MetadataEmulator() as md: ...``; ``url`` is the
    base URL to give a client. Thread-safe: tests change its state while clients poll.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        instance_id: str = "i-0123456789abcdef0",
        instance_type: str = "g5.xlarge",
        region: str = "us-east-1",
        availability_zone: str = "us-east-1a",
        clock: Callable[[], float] = time.monotonic,
        provider: str = "aws",
        vm_name: str = "vm-spot-0",
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
        self.provider = provider
        self._host = host
        self._port = port
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._tokens: dict[str, float] = {}
        self._static: dict[str, str] = {
            INSTANCE_ID_PATH: instance_id,
            INSTANCE_TYPE_PATH: instance_type,
            INSTANCE_LIFE_CYCLE_PATH: "spot",
            REGION_PATH: region,
            AVAILABILITY_ZONE_PATH: availability_zone,
        }
        # The instance identity document's pendingTime: when this "instance" launched.
        self._launched_at = _utc_now()
        self._notice: tuple[str, dt.datetime] | None = None
        self._rebalance: dt.datetime | None = None
        self._scheduled: list[dict[str, str]] = []
        self._faults: list[Fault] = []
        self._requests: Counter[str] = Counter()
        self._responses: Counter[str] = Counter()
        self._tokens_issued = 0
        self._connections = 0
        self._faults_applied = 0
        # GCP: the values behind the hanging GETs; a change wakes every waiting request.
        self._gcp_changed = threading.Condition(self._lock)
        self._gcp_salt = secrets.token_hex(4)
        self._gcp_items: dict[str, str] = {
            GCP_PREFIX + "instance/id": "4711471147114711471",
            GCP_PREFIX + "instance/name": vm_name,
            GCP_PREFIX + "instance/zone": "projects/123456789/zones/us-central1-a",
            GCP_PREFIX + "instance/machine-type": "projects/123456789/machineTypes/a2-highgpu-1g",
            GCP_PREFIX + "instance/scheduling/provisioning-model": "SPOT",
            GCP_PREEMPTED: "FALSE",
            GCP_MAINTENANCE_EVENT: "NONE",
        }
        # Azure: Scheduled Events and the approvals received.
        self._vm_name = vm_name
        self._azure_events: list[dict[str, Any]] = []
        self._azure_incarnation = 1
        self._azure_approvals: list[str] = []

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> MetadataEmulator:
        """Bind and serve in a background thread; returns self."""
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._stopping.clear()
        server = _Server((self._host, self._port), _Handler)
        server.emulator = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="imds-emulator",
            daemon=True,
        )
        self._thread.start()
        log.info("emulator_started", url=self.url)
        return self

    def stop(self) -> None:
        """Stop serving and hang up every open connection (kept-alive ones too)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        with self._gcp_changed:
            self._gcp_changed.notify_all()  # hanging GETs hang up
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            # Handler threads are blocked reading the next request of a kept-alive
            # connection; shutting the socket down ends them, as a stopped server would.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        log.info("emulator_stopped")

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``; only while started."""
        if self._server is None:
            raise RuntimeError("emulator is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> MetadataEmulator:
        # ``with MetadataEmulator().start() as md`` works as well as ``with MetadataEmulator()``.
        return self if self._server is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control API ----------------------------------------------------------------

    def set_notice(self, action: str = "terminate", time: dt.datetime | None = None) -> dt.datetime:
        """Publish a spot interruption notice; returns its time.

        ``time`` defaults to now + 120 s, or now for ``hibernate`` (no two-minute warning).
        """
        if action not in SPOT_ACTIONS:
            raise ValueError(f"spot action {action!r} is not one of {', '.join(SPOT_ACTIONS)}")
        if time is None:
            lead = 0.0 if action == "hibernate" else DEFAULT_NOTICE_LEAD_S
            time = _utc_now() + dt.timedelta(seconds=lead)
        when = _as_utc(time).replace(microsecond=0)
        with self._lock:
            self._notice = (action, when)
        log.info("emulator_notice_set", action=action, time=format_iso(when))
        return when

    def clear_notice(self) -> None:
        """Withdraw the notice (instance-action and termination-time go back to 404)."""
        with self._lock:
            self._notice = None
        log.info("emulator_notice_cleared")

    def set_rebalance(self, notice_time: dt.datetime | None = None) -> dt.datetime:
        """Publish a rebalance recommendation (``noticeTime`` defaults to now)."""
        when = _as_utc(notice_time or _utc_now()).replace(microsecond=0)
        with self._lock:
            self._rebalance = when
        log.info("emulator_rebalance_set", notice_time=format_iso(when))
        return when

    def clear_rebalance(self) -> None:
        """Withdraw the rebalance recommendation."""
        with self._lock:
            self._rebalance = None

    def set_scheduled_events(self, events: Sequence[Mapping[str, str]]) -> None:
        """Replace the scheduled maintenance events (see :func:`scheduled_event`)."""
        copied = [dict(e) for e in events]
        with self._lock:
            self._scheduled = copied
        log.info("emulator_scheduled_events_set", count=len(copied))

    def set_preempted(self, preempted: bool = True) -> None:
        """GCP: ``instance/preempted`` becomes ``TRUE`` (or ``FALSE``); hanging GETs answer."""
        self._set_gcp(GCP_PREEMPTED, "TRUE" if preempted else "FALSE")

    def set_maintenance_event(self, value: str = "TERMINATE_ON_HOST_MAINTENANCE") -> None:
        """GCP: ``instance/maintenance-event`` (``NONE``, ``MIGRATE_ON_HOST_MAINTENANCE``,
        ``TERMINATE_ON_HOST_MAINTENANCE``)."""
        self._set_gcp(GCP_MAINTENANCE_EVENT, value)

    def _set_gcp(self, path: str, value: str) -> None:
        with self._gcp_changed:
            self._gcp_items[path] = value
            self._gcp_changed.notify_all()
        log.info("emulator_gcp_value_set", path=path, value=value)

    def gcp_etag(self, path: str) -> str:
        """The ETag a GCP item has now (what a hanging GET's ``last_etag`` should be)."""
        with self._lock:
            return self._etag_of(path, self._gcp_items.get(path, ""))

    def _etag_of(self, path: str, value: str) -> str:
        return hashlib.sha256(f"{self._gcp_salt}|{path}|{value}".encode()).hexdigest()[:16]

    def set_azure_event(
        self,
        event_type: str = "Preempt",
        not_before: dt.datetime | None = None,
        **spec: Any,
    ) -> dict[str, Any]:
        """Azure: add one scheduled event for this VM (see :func:`azure_event`; its
        ``resources`` default to this VM's name); returns it."""
        spec.setdefault("resources", [self._vm_name])
        event = azure_event(event_type, not_before, **spec)
        with self._lock:
            self._azure_events.append(event)
            self._azure_incarnation += 1
        log.info("emulator_azure_event_set", **{k: v for k, v in event.items() if k != "Resources"})
        return event

    def clear_azure_events(self) -> None:
        """Azure: no events (as after they completed)."""
        with self._lock:
            self._azure_events.clear()
            self._azure_incarnation += 1

    def azure_approvals(self) -> list[str]:
        """Azure: the EventIds approved with StartRequests, in order."""
        with self._lock:
            return list(self._azure_approvals)

    def add_fault(
        self,
        kind: str,
        path_prefix: str = "/latest/",
        *,
        method: str | None = None,
        count: int | None = None,
        status: int = 503,
        delay_s: float = 0.0,
        body: str = DEFAULT_MALFORMED_BODY,
    ) -> Fault:
        """Misbehave on matching requests (see :class:`Fault`); faults apply in order added."""
        fault = Fault(kind, path_prefix, method, count, status, delay_s, body)
        return self.add_fault_spec(fault)

    def add_fault_spec(self, fault: Fault) -> Fault:
        """Add a prepared :class:`Fault`."""
        with self._lock:
            self._faults.append(fault)
        log.info("emulator_fault_added", **fault.to_dict())
        return fault

    def clear_faults(self) -> None:
        """Behave again."""
        with self._lock:
            self._faults.clear()
        log.info("emulator_faults_cleared")

    def expire_tokens(self) -> None:
        """Forget every issued token, as after expiry or a restart of the service."""
        with self._lock:
            self._tokens.clear()
        log.info("emulator_tokens_expired")

    def stats(self) -> EmulatorStats:
        """A snapshot of the counters."""
        with self._lock:
            return EmulatorStats(
                requests=dict(self._requests),
                responses=dict(self._responses),
                tokens_issued=self._tokens_issued,
                connections=self._connections,
                faults_applied=self._faults_applied,
            )

    def reset_stats(self) -> None:
        """Zero the counters."""
        with self._lock:
            self._requests.clear()
            self._responses.clear()
            self._tokens_issued = self._connections = self._faults_applied = 0

    # -- the service ----------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    if fault.count is not None:
                        fault.count -= 1
                        if fault.count == 0:
                            self._faults.remove(fault)
                    self._faults_applied += 1
                    return fault
        return None

    def _answer_for(
        self, method: str, path: str, query: str, headers: Message, body: bytes
    ) -> _Reply:
        if self.provider == "gcp":
            return self._answer_gcp(method, path, query, headers)
        if self.provider == "azure":
            return self._answer_azure(method, path, query, headers, body)
        return self._answer(method, path, headers)

    def _answer_gcp(self, method: str, path: str, query: str, headers: Message) -> _Reply:
        flavor = (("Metadata-Flavor", "Google"),)
        if headers.get("Metadata-Flavor") != "Google" or headers.get("X-Forwarded-For"):
            # GCE refuses requests without the header (and any that went through a proxy).
            return _Reply(403, b"Missing Metadata-Flavor:Google header.", headers=flavor)
        if method != "GET":
            return _Reply(405, b"Method Not Allowed", headers=flavor)
        params = parse_qs(query)
        with self._gcp_changed:
            if path not in self._gcp_items:
                return _Reply(404, b"Not Found", headers=flavor)
            value = self._gcp_items[path]
            etag = self._etag_of(path, value)
            if params.get("wait_for_change", ["false"])[0].lower() == "true":
                last = params.get("last_etag", [None])[0]
                hang = float(params.get("timeout_sec", [GCP_DEFAULT_HANG_S])[0])
                if last is None or last == etag:
                    end = time.monotonic() + hang
                    while self._gcp_items[path] == value and not self._stopping.is_set():
                        left = end - time.monotonic()
                        if left <= 0:
                            break
                        self._gcp_changed.wait(min(left, 0.5))
                    if self._stopping.is_set():
                        return _HANG_UP
                    value = self._gcp_items[path]
                    etag = self._etag_of(path, value)
        return _Reply(200, value.encode(), "application/text", (*flavor, ("ETag", etag)))

    def _answer_azure(
        self, method: str, path: str, query: str, headers: Message, body: bytes
    ) -> _Reply:
        if headers.get("Metadata") != "true" or headers.get("X-Forwarded-For"):
            return _json_reply(
                400, {"error": "Bad request. Required metadata header not specified"}
            )
        params = parse_qs(query)
        if "api-version" not in params:
            return _json_reply(400, {"error": "Bad request. api-version was not specified"})
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
                return _json_reply(404, {"error": "Not found"})
            return _Reply(200, values[item].encode())
        if path != AZURE_EVENTS_PATH:
            return _json_reply(404, {"error": "Not found"})
        if method == "GET":
            with self._lock:
                doc = {
                    "DocumentIncarnation": self._azure_incarnation,
                    "Events": [dict(e) for e in self._azure_events],
                }
            return _json_reply(200, doc)
        if method == "POST":
            try:
                starts = json.loads(body)["StartRequests"]
                ids = [str(s["EventId"]) for s in starts]
            except (ValueError, KeyError, TypeError):
                return _json_reply(400, {"error": "Bad request. StartRequests expected"})
            with self._lock:
                for event in self._azure_events:
                    if event["EventId"] in ids:
                        event["EventStatus"] = "Started"
                self._azure_approvals.extend(ids)
                self._azure_incarnation += 1
            log.info("emulator_azure_events_approved", event_ids=ids)
            return _Reply(200, b"")
        return _json_reply(405, {"error": "Method not allowed"})

    def _answer(self, method: str, path: str, headers: Message) -> _Reply:
        if path == TOKEN_PATH:
            return self._answer_token(method, headers)
        if not path.startswith("/latest/"):
            return _Reply(404, b"Not Found")
        token = headers.get(TOKEN_HEADER)
        now = self._clock()
        with self._lock:
            expiry = self._tokens.get(token) if token else None
            if expiry is not None and expiry <= now:
                del self._tokens[cast(str, token)]
                expiry = None
        if expiry is None:
            # IMDSv2 required: no token, an unknown one or an expired one is 401, never v1.
            return _Reply(401, b"Unauthorized")
        if method != "GET":
            return _Reply(405, b"Method Not Allowed", headers=(("Allow", "GET"),))
        value = self._lookup(path)
        if value is None:
            return _Reply(404, b"Not Found")
        return _Reply(200, value.encode())

    def _answer_token(self, method: str, headers: Message) -> _Reply:
        if method != "PUT":
            return _Reply(405, b"Method Not Allowed", headers=(("Allow", "PUT"),))
        if headers.get("X-Forwarded-For") is not None:
            # AWS refuses token requests that went through a proxy.
            return _Reply(403, b"Forbidden")
        raw = headers.get(TOKEN_TTL_HEADER)
        if raw is None or not raw.strip().isdigit():
            return _Reply(400, b"Bad Request")
        ttl = int(raw.strip())
        if not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
            return _Reply(400, b"Bad Request")
        token = secrets.token_urlsafe(42)
        now = self._clock()
        with self._lock:
            # Drop dead tokens as new ones come in, so a long demo does not grow the map.
            for dead in [t for t, exp in self._tokens.items() if exp <= now]:
                del self._tokens[dead]
            self._tokens[token] = now + ttl
            self._tokens_issued += 1
        return _Reply(200, token.encode(), headers=((TOKEN_TTL_HEADER, str(ttl)),))

    def launch(self, instance_id: str) -> None:
        """Stand for a new instance from now on: its own id, launched now (the identity
        document's ``pendingTime``). Notices and events are not touched."""
        with self._lock:
            self._static[INSTANCE_ID_PATH] = instance_id
            self._launched_at = _utc_now()

    def _identity_document(self) -> str:
        """``dynamic/instance-identity/document`` in the form AWS documents (the fields
        a supervisor reads; no signature)."""
        s = self._static
        return json.dumps(
            {
                "instanceId": s[INSTANCE_ID_PATH],
                "instanceType": s[INSTANCE_TYPE_PATH],
                "availabilityZone": s[AVAILABILITY_ZONE_PATH],
                "region": s[REGION_PATH],
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
            items[SCHEDULED_EVENTS_PATH] = json.dumps(self._scheduled, indent=2)
            if self._notice is not None:
                action, when = self._notice
                # The documented form: {"action": "terminate", "time": "2017-09-18T08:22:00Z"}
                items[INSTANCE_ACTION_PATH] = json.dumps(
                    {"action": action, "time": format_iso(when)}
                )
                if action == "terminate":
                    items[TERMINATION_TIME_PATH] = format_iso(when)
            if self._rebalance is not None:
                items[REBALANCE_PATH] = json.dumps({"noticeTime": format_iso(self._rebalance)})
        return items

    def _lookup(self, path: str) -> str | None:
        items = self._items()
        if path in items:
            return items[path]
        # A directory answers with its entries, one per line, sub-directories with a "/".
        prefix = path if path.endswith("/") else path + "/"
        if not prefix.startswith(META_DATA_PREFIX):
            return None
        entries = set()
        for key in items:
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                head, sep, _ = rest.partition("/")
                entries.add(head + sep)
        return "\n".join(sorted(entries)) if entries else None

    def _count(self, method: str, path: str) -> None:
        with self._lock:
            self._requests[f"{method} {path}"] += 1

    def _count_response(self, status: int) -> None:
        with self._lock:
            self._responses[str(status)] += 1

    def _connected(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.add(sock)
            self._connections += 1

    def _disconnected(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.discard(sock)

    # -- control over HTTP ------------------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> _Reply:
        try:
            result = self._control_dispatch(method, path, body)
        except _ControlError as exc:
            return _json_reply(exc.status, {"error": str(exc)})
        except (ValueError, TypeError, KeyError) as exc:
            return _json_reply(400, {"error": str(exc)})
        return _json_reply(200, result)

    def _control_dispatch(self, method: str, path: str, body: bytes) -> Any:
        doc = _parse_body(body)
        if path == CONTROL_NOTICE_PATH and method == "POST":
            spec = _as_object(doc)
            when = _time_from_spec(spec)
            t = self.set_notice(str(spec.get("action", "terminate")), when)
            return {"action": spec.get("action", "terminate"), "time": format_iso(t)}
        if path == CONTROL_NOTICE_PATH and method == "DELETE":
            self.clear_notice()
            return {"cleared": "notice"}
        if path == CONTROL_REBALANCE_PATH and method == "POST":
            t = self.set_rebalance(_time_from_spec(_as_object(doc)))
            return {"noticeTime": format_iso(t)}
        if path == CONTROL_REBALANCE_PATH and method == "DELETE":
            self.clear_rebalance()
            return {"cleared": "rebalance"}
        if path == CONTROL_SCHEDULED_PATH and method in ("POST", "PUT"):
            events = doc.get("events") if isinstance(doc, dict) else doc
            if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
                raise ValueError("scheduled events must be a JSON list of objects")
            self.set_scheduled_events(events)
            return {"events": len(events)}
        if path == CONTROL_SCHEDULED_PATH and method == "DELETE":
            self.set_scheduled_events([])
            return {"events": 0}
        if path == CONTROL_FAULT_PATH and method == "POST":
            return self.add_fault_spec(Fault.from_dict(_as_object(doc))).to_dict()
        if path == CONTROL_FAULT_PATH and method == "DELETE":
            self.clear_faults()
            return {"cleared": "faults"}
        if path == CONTROL_TOKENS_EXPIRE_PATH and method == "POST":
            self.expire_tokens()
            return {"expired": "tokens"}
        if path == CONTROL_GCP_PATH and method == "POST":
            spec = _as_object(doc)
            if "preempted" in spec:
                self.set_preempted(bool(spec["preempted"]))
            if "maintenance_event" in spec:
                self.set_maintenance_event(str(spec["maintenance_event"]))
            return {"set": sorted(spec)}
        if path == CONTROL_AZURE_EVENTS_PATH and method == "POST":
            spec = dict(_as_object(doc))
            when = _time_from_spec(spec)
            spec.pop("time", None)
            spec.pop("in_seconds", None)
            return self.set_azure_event(str(spec.pop("event_type", "Preempt")), when, **spec)
        if path == CONTROL_AZURE_EVENTS_PATH and method == "DELETE":
            self.clear_azure_events()
            return {"cleared": "events"}
        if path == CONTROL_AZURE_APPROVALS_PATH and method == "GET":
            return {"approved": self.azure_approvals()}
        if path == CONTROL_STATS_PATH and method == "GET":
            return self.stats().to_dict()
        if path == CONTROL_STATS_PATH and method == "DELETE":
            self.reset_stats()
            return {"cleared": "stats"}
        raise _ControlError(404, f"no control endpoint {method} {path}")


def _parse_body(body: bytes) -> Any:
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ValueError(f"control body is not JSON: {exc}") from None


def _as_object(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ValueError("control body must be a JSON object")
    return doc


def _time_from_spec(spec: Mapping[str, Any]) -> dt.datetime | None:
    if "time" in spec and "in_seconds" in spec:
        raise ValueError("give either time or in_seconds, not both")
    if "time" in spec:
        return _parse_iso(str(spec["time"]))
    if "in_seconds" in spec:
        return _utc_now() + dt.timedelta(seconds=float(spec["in_seconds"]))
    return None


def _json_reply(status: int, doc: Any) -> _Reply:
    return _Reply(status, json.dumps(doc).encode(), "application/json")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    emulator: MetadataEmulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up before a delayed answer is the point of a
        # delay fault, not an error worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1: connections are kept alive, as the real service keeps them.
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"
    sys_version = ""
    # Headers and body go out in two writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms a request), which no real service does.
    disable_nagle_algorithm = True

    @property
    def _em(self) -> MetadataEmulator:
        return cast(_Server, self.server).emulator

    def setup(self) -> None:
        super().setup()
        self._em._connected(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._em._disconnected(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        # The emulator's own events are logged; per-request lines would drown them.
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        em = self._em
        parts = urlsplit(self.path)
        path = parts.path
        body = self._read_body()
        if path.startswith(CONTROL_PREFIX):
            self._send(em._control(self.command, path, body))
            return
        em._count(self.command, path)
        fault = em._take_fault(self.command, path)
        if fault is not None:
            if fault.delay_s > 0 and em._stopping.wait(fault.delay_s):
                self.close_connection = True
                return
            if fault.kind == "close":
                # Hang up without a byte of answer.
                self.close_connection = True
                return
            if fault.kind == "status":
                phrase = http.client.responses.get(fault.status, "Error")
                self._send(_Reply(fault.status, phrase.encode()))
                return
            if fault.kind == "malformed":
                self._send(_Reply(200, fault.body.encode()))
                return
        reply = em._answer_for(self.command, path, parts.query, self.headers, body)
        if reply is _HANG_UP:
            self.close_connection = True
            return
        if fault is not None and fault.kind == "etag":
            wrong = ("ETag", "0000" + secrets.token_hex(6))
            reply = _Reply(
                reply.status,
                reply.body,
                reply.content_type,
                (*(h for h in reply.headers if h[0] != "ETag"), wrong),
            )
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        self._em._count_response(reply.status)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)


class EmulatorControl:
    """Drive an emulator in another process over its HTTP control API."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"emulator URL {url!r} is not http://host:port")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._timeout = timeout

    def _call(self, method: str, path: str, doc: Any = None) -> Any:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            body = None if doc is None else json.dumps(doc).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            answer = json.loads(resp.read() or b"null")
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"emulator control {method} {path}: HTTP {resp.status}: {answer}")
        return answer

    def set_notice(
        self, action: str = "terminate", *, in_seconds: float | None = None, time: str | None = None
    ) -> str:
        """Publish a notice; returns its time as the service will show it."""
        spec: dict[str, Any] = {"action": action}
        if in_seconds is not None:
            spec["in_seconds"] = in_seconds
        if time is not None:
            spec["time"] = time
        return str(self._call("POST", CONTROL_NOTICE_PATH, spec)["time"])

    def clear_notice(self) -> None:
        """Withdraw the notice."""
        self._call("DELETE", CONTROL_NOTICE_PATH)

    def set_rebalance(self, time: str | None = None) -> str:
        """Publish a rebalance recommendation; returns its noticeTime."""
        spec = {} if time is None else {"time": time}
        return str(self._call("POST", CONTROL_REBALANCE_PATH, spec)["noticeTime"])

    def set_scheduled_events(self, events: Sequence[Mapping[str, str]]) -> None:
        """Replace the scheduled maintenance events."""
        self._call("POST", CONTROL_SCHEDULED_PATH, [dict(e) for e in events])

    def set_preempted(self, preempted: bool = True) -> None:
        """GCP: ``instance/preempted``."""
        self._call("POST", CONTROL_GCP_PATH, {"preempted": preempted})

    def set_maintenance_event(self, value: str = "TERMINATE_ON_HOST_MAINTENANCE") -> None:
        """GCP: ``instance/maintenance-event``."""
        self._call("POST", CONTROL_GCP_PATH, {"maintenance_event": value})

    def set_azure_event(
        self, event_type: str = "Preempt", *, in_seconds: float | None = None, **spec: Any
    ) -> dict[str, Any]:
        """Azure: add a scheduled event (``in_seconds``: its NotBefore from now)."""
        body = {"event_type": event_type, **spec}
        if in_seconds is not None:
            body["in_seconds"] = in_seconds
        return dict(self._call("POST", CONTROL_AZURE_EVENTS_PATH, body))

    def azure_approvals(self) -> list[str]:
        """Azure: the EventIds approved so far."""
        return list(self._call("GET", CONTROL_AZURE_APPROVALS_PATH)["approved"])

    def add_fault(self, kind: str, path_prefix: str = "/latest/", **spec: Any) -> dict[str, Any]:
        """Add a fault (same keys as :class:`Fault`)."""
        return dict(
            self._call(
                "POST", CONTROL_FAULT_PATH, {"kind": kind, "path_prefix": path_prefix, **spec}
            )
        )

    def clear_faults(self) -> None:
        """Remove every fault."""
        self._call("DELETE", CONTROL_FAULT_PATH)

    def expire_tokens(self) -> None:
        """Forget every issued token."""
        self._call("POST", CONTROL_TOKENS_EXPIRE_PATH)

    def stats(self) -> EmulatorStats:
        """The emulator's counters."""
        return EmulatorStats.from_dict(self._call("GET", CONTROL_STATS_PATH))

    def reset_stats(self) -> None:
        """Zero the emulator's counters."""
        self._call("DELETE", CONTROL_STATS_PATH)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m daemon.standins.emulator``: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m daemon.standins.emulator",
        description="A local EC2 metadata service (IMDSv2).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    parser.add_argument(
        "--notice-in", type=float, metavar="S", help="publish a notice for now + S seconds"
    )
    parser.add_argument("--action", default="terminate", choices=SPOT_ACTIONS)
    parser.add_argument(
        "--provider", default="aws", choices=PROVIDERS, help="whose metadata service (default aws)"
    )
    args = parser.parse_args(argv)
    # Events go to stderr so that stdout carries exactly one line: the URL.
    configure_logging(stream=sys.stderr)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()  # only record; the main thread stops the server

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    emulator = MetadataEmulator(args.host, args.port, provider=args.provider).start()
    try:
        if args.notice_in is not None and args.provider == "gcp":
            threading.Timer(args.notice_in, emulator.set_preempted).start()
        elif args.notice_in is not None and args.provider == "azure":
            emulator.set_azure_event("Preempt", _utc_now() + dt.timedelta(seconds=args.notice_in))
        elif args.notice_in is not None:
            emulator.set_notice(args.action, _utc_now() + dt.timedelta(seconds=args.notice_in))
        print(emulator.url, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
