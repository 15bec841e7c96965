"""The GCE metadata server mode (``provider="gcp"``), under ``/computeMetadata/v1/``.

Every request needs ``Metadata-Flavor: Google`` (403 without, or with
``X-Forwarded-For``); answers carry ``Metadata-Flavor: Google`` and an ``ETag`` (a hash
of the value). ``instance/preempted`` is ``FALSE`` until set, ``instance/maintenance-event``
is ``NONE`` until set. ``?wait_for_change=true`` hangs until the value changes or
``timeout_sec`` passes, and answers at once when ``last_etag`` is not the current ETag,
as GCE does.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from email.message import Message
from urllib.parse import parse_qs

import structlog

from daemon.standins.emulator.server import HANG_UP, Reply

log = structlog.get_logger(__name__)

GCP_PREFIX = "/computeMetadata/v1/"
GCP_PREEMPTED = GCP_PREFIX + "instance/preempted"
GCP_MAINTENANCE_EVENT = GCP_PREFIX + "instance/maintenance-event"
GCP_DEFAULT_HANG_S = 300.0


class GceMetadata:
    """The values behind the GCE paths; a change wakes every hanging GET."""

    def __init__(self, lock: threading.Lock, stopping: threading.Event, vm_name: str) -> None:
        self._stopping = stopping
        self._changed = threading.Condition(lock)
        self._salt = secrets.token_hex(4)
        self._items: dict[str, str] = {
            GCP_PREFIX + "instance/id": "4711471147114711471",
            GCP_PREFIX + "instance/name": vm_name,
            GCP_PREFIX + "instance/zone": "projects/123456789/zones/us-central1-a",
            GCP_PREFIX + "instance/machine-type": "projects/123456789/machineTypes/a2-highgpu-1g",
            GCP_PREFIX + "instance/scheduling/provisioning-model": "SPOT",
            GCP_PREEMPTED: "FALSE",
            GCP_MAINTENANCE_EVENT: "NONE",
        }

    def set(self, path: str, value: str) -> None:
        """Give ``path`` a new value; hanging GETs answer."""
        with self._changed:
            self._items[path] = value
            self._changed.notify_all()
        log.info("emulator_gcp_value_set", path=path, value=value)

    def wake(self) -> None:
        """Wake every hanging GET (the emulator is stopping: they hang up)."""
        with self._changed:
            self._changed.notify_all()

    def etag(self, path: str) -> str:
        """The ETag ``path`` has now."""
        with self._changed:
            return self._etag_of(path, self._items.get(path, ""))

    def _etag_of(self, path: str, value: str) -> str:
        return hashlib.sha256(f"{self._salt}|{path}|{value}".encode()).hexdigest()[:16]

    def answer(self, method: str, path: str, query: str, headers: Message) -> Reply:
        """The answer to a request outside the control prefix."""
        flavor = (("Metadata-Flavor", "Google"),)
        if headers.get("Metadata-Flavor") != "Google" or headers.get("X-Forwarded-For"):
            # GCE refuses requests without the header (and any that went through a proxy).
            return Reply(403, b"Missing Metadata-Flavor:Google header.", headers=flavor)
        if method != "GET":
            return Reply(405, b"Method Not Allowed", headers=flavor)
        params = parse_qs(query)
        with self._changed:
            if path not in self._items:
                return Reply(404, b"Not Found", headers=flavor)
            value = self._items[path]
            etag = self._etag_of(path, value)
            if params.get("wait_for_change", ["false"])[0].lower() == "true":
                last = params.get("last_etag", [None])[0]
                hang = float(params.get("timeout_sec", [GCP_DEFAULT_HANG_S])[0])
                if last is None or last == etag:
                    end = time.monotonic() + hang
                    while self._items[path] == value and not self._stopping.is_set():
                        left = end - time.monotonic()
                        if left <= 0:
                            break
                        self._changed.wait(min(left, 0.5))
                    if self._stopping.is_set():
                        return HANG_UP
                    value = self._items[path]
                    etag = self._etag_of(path, value)
        return Reply(200, value.encode(), "application/text", (*flavor, ("ETag", etag)))
