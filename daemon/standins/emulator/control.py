"""The emulator's HTTP control API (server side), for an emulator in another process.

On ``/_emulator/...``, a prefix AWS never uses: set and clear notices, events and
faults, expire tokens, read and reset the counters. Each endpoint calls the
:class:`~daemon.standins.emulator.MetadataEmulator` method of the same name; the
client side is :class:`.client.EmulatorControl`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from daemon.standins.emulator.faults import Fault
from daemon.standins.emulator.server import Reply, json_reply
from daemon.standins.emulator.times import format_iso, parse_iso, utc_now

if TYPE_CHECKING:
    from daemon.standins.emulator.service import MetadataEmulator

CONTROL_NOTICE_PATH = "/_emulator/notice"
CONTROL_REBALANCE_PATH = "/_emulator/rebalance"
CONTROL_SCHEDULED_PATH = "/_emulator/scheduled-events"
CONTROL_FAULT_PATH = "/_emulator/fault"
CONTROL_TOKENS_EXPIRE_PATH = "/_emulator/tokens/expire"
CONTROL_STATS_PATH = "/_emulator/stats"
CONTROL_GCP_PATH = "/_emulator/gcp"
CONTROL_AZURE_EVENTS_PATH = "/_emulator/azure/events"
CONTROL_AZURE_APPROVALS_PATH = "/_emulator/azure/approvals"


class _ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def handle(em: MetadataEmulator, method: str, path: str, body: bytes) -> Reply:
    """The answer to one control request: 200 with JSON, 400 or 404 with an error."""
    try:
        result = _dispatch(em, method, path, body)
    except _ControlError as exc:
        return json_reply(exc.status, {"error": str(exc)})
    except (ValueError, TypeError, KeyError) as exc:
        return json_reply(400, {"error": str(exc)})
    return json_reply(200, result)


def _dispatch(em: MetadataEmulator, method: str, path: str, body: bytes) -> Any:
    doc = _parse_body(body)
    if path == CONTROL_NOTICE_PATH and method == "POST":
        spec = _as_object(doc)
        when = _time_from_spec(spec)
        t = em.set_notice(str(spec.get("action", "terminate")), when)
        return {"action": spec.get("action", "terminate"), "time": format_iso(t)}
    if path == CONTROL_NOTICE_PATH and method == "DELETE":
        em.clear_notice()
        return {"cleared": "notice"}
    if path == CONTROL_REBALANCE_PATH and method == "POST":
        t = em.set_rebalance(_time_from_spec(_as_object(doc)))
        return {"noticeTime": format_iso(t)}
    if path == CONTROL_REBALANCE_PATH and method == "DELETE":
        em.clear_rebalance()
        return {"cleared": "rebalance"}
    if path == CONTROL_SCHEDULED_PATH and method in ("POST", "PUT"):
        events = doc.get("events") if isinstance(doc, dict) else doc
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise ValueError("scheduled events must be a JSON list of objects")
        em.set_scheduled_events(events)
        return {"events": len(events)}
    if path == CONTROL_SCHEDULED_PATH and method == "DELETE":
        em.set_scheduled_events([])
        return {"events": 0}
    if path == CONTROL_FAULT_PATH and method == "POST":
        return em.add_fault_spec(Fault.from_dict(_as_object(doc))).to_dict()
    if path == CONTROL_FAULT_PATH and method == "DELETE":
        em.clear_faults()
        return {"cleared": "faults"}
    if path == CONTROL_TOKENS_EXPIRE_PATH and method == "POST":
        em.expire_tokens()
        return {"expired": "tokens"}
    if path == CONTROL_GCP_PATH and method == "POST":
        spec = _as_object(doc)
        if "preempted" in spec:
            em.set_preempted(bool(spec["preempted"]))
        if "maintenance_event" in spec:
            em.set_maintenance_event(str(spec["maintenance_event"]))
        return {"set": sorted(spec)}
    if path == CONTROL_AZURE_EVENTS_PATH and method == "POST":
        spec = dict(_as_object(doc))
        when = _time_from_spec(spec)
        spec.pop("time", None)
        spec.pop("in_seconds", None)
        return em.set_azure_event(str(spec.pop("event_type", "Preempt")), when, **spec)
    if path == CONTROL_AZURE_EVENTS_PATH and method == "DELETE":
        em.clear_azure_events()
        return {"cleared": "events"}
    if path == CONTROL_AZURE_APPROVALS_PATH and method == "GET":
        return {"approved": em.azure_approvals()}
    if path == CONTROL_STATS_PATH and method == "GET":
        return em.stats().to_dict()
    if path == CONTROL_STATS_PATH and method == "DELETE":
        em.reset_stats()
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
        return parse_iso(str(spec["time"]))
    if "in_seconds" in spec:
        return utc_now() + dt.timedelta(seconds=float(spec["in_seconds"]))
    return None
