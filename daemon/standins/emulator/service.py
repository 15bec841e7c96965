"""The metadata emulator: one HTTP service on loopback, the cloud it stands for, and its
control API in Python.

:class:`MetadataEmulator` starts and stops the server (:mod:`.server`), sends each
request to its provider's answers (:mod:`.aws` with :mod:`.tokens`, :mod:`.gce`,
:mod:`.azure`), keeps the faults to apply and the counters. What any cloud answers is
in those modules, not here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from email.message import Message
from typing import Any

import structlog

from daemon.standins.emulator import control
from daemon.standins.emulator.aws import AwsMetadata
from daemon.standins.emulator.azure import AzureScheduledEvents
from daemon.standins.emulator.faults import DEFAULT_MALFORMED_BODY, Fault
from daemon.standins.emulator.gce import GCP_MAINTENANCE_EVENT, GCP_PREEMPTED, GceMetadata
from daemon.standins.emulator.server import Handler, Reply, Server
from daemon.standins.emulator.stats import EmulatorStats
from daemon.standins.emulator.tokens import TokenStore

log = structlog.get_logger(__name__)

PROVIDERS = ("aws", "gcp", "azure")


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
        # One lock for the whole emulator: the clouds' state, the faults, the counters.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._tokens = TokenStore(self._lock, clock)
        self._aws = AwsMetadata(
            self._lock,
            self._tokens,
            instance_id=instance_id,
            instance_type=instance_type,
            region=region,
            availability_zone=availability_zone,
        )
        self._gce = GceMetadata(self._lock, self._stopping, vm_name)
        self._azure = AzureScheduledEvents(self._lock, vm_name)
        self._faults: list[Fault] = []
        self._requests: Counter[str] = Counter()
        self._responses: Counter[str] = Counter()
        self._connections = 0
        self._faults_applied = 0

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> MetadataEmulator:
        """Bind and serve in a background thread; returns self."""
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._stopping.clear()
        server = Server((self._host, self._port), Handler)
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
        self._gce.wake()  # hanging GETs hang up
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

    # -- control API: AWS -------------------------------------------------------------

    def set_notice(self, action: str = "terminate", time: dt.datetime | None = None) -> dt.datetime:
        """Publish a spot interruption notice; returns its time.

        ``time`` defaults to now + 120 s, or now for ``hibernate`` (no two-minute warning).
        """
        return self._aws.set_notice(action, time)

    def clear_notice(self) -> None:
        """Withdraw the notice (instance-action and termination-time go back to 404)."""
        self._aws.clear_notice()

    def set_rebalance(self, notice_time: dt.datetime | None = None) -> dt.datetime:
        """Publish a rebalance recommendation (``noticeTime`` defaults to now)."""
        return self._aws.set_rebalance(notice_time)

    def clear_rebalance(self) -> None:
        """Withdraw the rebalance recommendation."""
        self._aws.clear_rebalance()

    def set_scheduled_events(self, events: Sequence[Mapping[str, str]]) -> None:
        """Replace the scheduled maintenance events (see :func:`scheduled_event`)."""
        self._aws.set_scheduled_events(events)

    def launch(self, instance_id: str) -> None:
        """Stand for a new instance from now on: its own id, launched now (the identity
        document's ``pendingTime``). Notices and events are not touched."""
        self._aws.launch(instance_id)

    def expire_tokens(self) -> None:
        """Forget every issued token, as after expiry or a restart of the service."""
        self._tokens.expire_all()
        log.info("emulator_tokens_expired")

    # -- control API: GCP and Azure ---------------------------------------------------

    def set_preempted(self, preempted: bool = True) -> None:
        """GCP: ``instance/preempted`` becomes ``TRUE`` (or ``FALSE``); hanging GETs answer."""
        self._gce.set(GCP_PREEMPTED, "TRUE" if preempted else "FALSE")

    def set_maintenance_event(self, value: str = "TERMINATE_ON_HOST_MAINTENANCE") -> None:
        """GCP: ``instance/maintenance-event`` (``NONE``, ``MIGRATE_ON_HOST_MAINTENANCE``,
        ``TERMINATE_ON_HOST_MAINTENANCE``)."""
        self._gce.set(GCP_MAINTENANCE_EVENT, value)

    def gcp_etag(self, path: str) -> str:
        """The ETag a GCP item has now (what a hanging GET's ``last_etag`` should be)."""
        return self._gce.etag(path)

    def set_azure_event(
        self,
        event_type: str = "Preempt",
        not_before: dt.datetime | None = None,
        **spec: Any,
    ) -> dict[str, Any]:
        """Azure: add one scheduled event for this VM (see :func:`azure_event`; its
        ``resources`` default to this VM's name); returns it."""
        return self._azure.add(event_type, not_before, **spec)

    def clear_azure_events(self) -> None:
        """Azure: no events (as after they completed)."""
        self._azure.clear()

    def azure_approvals(self) -> list[str]:
        """Azure: the EventIds approved with StartRequests, in order."""
        return self._azure.approvals()

    # -- control API: faults and counters ---------------------------------------------

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

    def stats(self) -> EmulatorStats:
        """A snapshot of the counters."""
        with self._lock:
            return EmulatorStats(
                requests=dict(self._requests),
                responses=dict(self._responses),
                tokens_issued=self._tokens.issued,
                connections=self._connections,
                faults_applied=self._faults_applied,
            )

    def reset_stats(self) -> None:
        """Zero the counters."""
        with self._lock:
            self._requests.clear()
            self._responses.clear()
            self._tokens.issued = self._connections = self._faults_applied = 0

    # -- the service (called by the handler) ------------------------------------------

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
    ) -> Reply:
        if self.provider == "gcp":
            return self._gce.answer(method, path, query, headers)
        if self.provider == "azure":
            return self._azure.answer(method, path, query, headers, body)
        return self._aws.answer(method, path, headers)

    def _control(self, method: str, path: str, body: bytes) -> Reply:
        return control.handle(self, method, path, body)

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
