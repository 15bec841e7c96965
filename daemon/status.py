"""``spot-supervisor status``: read the daemon's ``state.json`` and say what it is doing."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import psutil

from daemon.config import Config
from daemon.state import read_state

_FIELDS = (
    ("phase", "phase"),
    ("child_pid", "child pid"),
    ("newest_local_step", "newest local step"),
    ("newest_committed_step", "newest committed step"),
    ("last_upload_mbps", "last upload MB/s"),
    ("restarts", "trainer restarts"),
    ("drain_deadline", "drain deadline"),
)


def _alive(pid: Any) -> bool:
    return isinstance(pid, int) and psutil.pid_exists(pid)


def render_status(cfg: Config, as_json: bool) -> tuple[str, int]:
    """The status text and the exit code: 0 when a daemon is running, 3 when none is."""
    try:
        doc = read_state(cfg.state_file)
    except FileNotFoundError:
        msg = f"no state file at {cfg.state_file}: the daemon has not run here"
        return (json.dumps({"running": False, "error": msg}) if as_json else msg), 3
    except (OSError, ValueError) as exc:
        msg = f"state file {cfg.state_file} is unreadable: {exc}"
        return (json.dumps({"running": False, "error": msg}) if as_json else msg), 1
    running = _alive(doc.get("supervisor_pid")) and doc.get("phase") not in ("done", "failed")
    doc["running"] = running
    if as_json:
        return json.dumps(doc, indent=2), 0 if running else 3
    age = time.time() - float(doc.get("updated_at", time.time()))
    lines = [
        f"run {doc.get('run_id')}: "
        + ("running" if running else "not running")
        + f" (supervisor pid {doc.get('supervisor_pid')}, updated {age:.0f}s ago)"
    ]
    for key, label in _FIELDS:
        value = doc.get(key)
        lines.append(f"  {label + ':':24} {'-' if value is None else value}")
    notice = doc.get("last_notice")
    if notice:
        lines.append(
            f"  {'last notice:':24} {notice.get('action')} from {notice.get('source')}, "
            f"deadline {notice.get('deadline')}"
        )
    else:
        lines.append(f"  {'last notice:':24} none")
    since = doc.get("phase_since")
    if isinstance(since, (int, float)):
        when = dt.datetime.fromtimestamp(since, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append(f"  {'in phase since:':24} {when}")
    return "\n".join(lines), 0 if running else 3
