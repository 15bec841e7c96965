"""Driving an emulator in another process over its HTTP control API (the client side).

For an emulator started as ``python -m daemon.standins.emulator``; the endpoints are
served by :mod:`.control`, whose path constants it shares.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from daemon.standins.emulator import control
from daemon.standins.emulator.stats import EmulatorStats


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
        return str(self._call("POST", control.CONTROL_NOTICE_PATH, spec)["time"])

    def clear_notice(self) -> None:
        """Withdraw the notice."""
        self._call("DELETE", control.CONTROL_NOTICE_PATH)

    def set_rebalance(self, time: str | None = None) -> str:
        """Publish a rebalance recommendation; returns its noticeTime."""
        spec = {} if time is None else {"time": time}
        return str(self._call("POST", control.CONTROL_REBALANCE_PATH, spec)["noticeTime"])

    def set_scheduled_events(self, events: Sequence[Mapping[str, str]]) -> None:
        """Replace the scheduled maintenance events."""
        self._call("POST", control.CONTROL_SCHEDULED_PATH, [dict(e) for e in events])

    def set_preempted(self, preempted: bool = True) -> None:
        """GCP: ``instance/preempted``."""
        self._call("POST", control.CONTROL_GCP_PATH, {"preempted": preempted})

    def set_maintenance_event(self, value: str = "TERMINATE_ON_HOST_MAINTENANCE") -> None:
        """GCP: ``instance/maintenance-event``."""
        self._call("POST", control.CONTROL_GCP_PATH, {"maintenance_event": value})

    def set_azure_event(
        self, event_type: str = "Preempt", *, in_seconds: float | None = None, **spec: Any
    ) -> dict[str, Any]:
        """Azure: add a scheduled event (``in_seconds``: its NotBefore from now)."""
        body = {"event_type": event_type, **spec}
        if in_seconds is not None:
            body["in_seconds"] = in_seconds
        return dict(self._call("POST", control.CONTROL_AZURE_EVENTS_PATH, body))

    def azure_approvals(self) -> list[str]:
        """Azure: the EventIds approved so far."""
        return list(self._call("GET", control.CONTROL_AZURE_APPROVALS_PATH)["approved"])

    def add_fault(self, kind: str, path_prefix: str = "/latest/", **spec: Any) -> dict[str, Any]:
        """Add a fault (same keys as :class:`Fault`)."""
        return dict(
            self._call(
                "POST",
                control.CONTROL_FAULT_PATH,
                {"kind": kind, "path_prefix": path_prefix, **spec},
            )
        )

    def clear_faults(self) -> None:
        """Remove every fault."""
        self._call("DELETE", control.CONTROL_FAULT_PATH)

    def expire_tokens(self) -> None:
        """Forget every issued token."""
        self._call("POST", control.CONTROL_TOKENS_EXPIRE_PATH)

    def stats(self) -> EmulatorStats:
        """The emulator's counters."""
        return EmulatorStats.from_dict(self._call("GET", control.CONTROL_STATS_PATH))

    def reset_stats(self) -> None:
        """Zero the emulator's counters."""
        self._call("DELETE", control.CONTROL_STATS_PATH)
