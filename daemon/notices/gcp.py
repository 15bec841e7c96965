"""The GCP sources: the GCE metadata server's ``instance/preempted`` and
``instance/maintenance-event``, each followed by hanging GETs on a thread of its own.

GCE does not publish a time: a spot (or preemptible) VM learns it is being preempted
when ``preempted`` turns ``TRUE``, and has about 30 seconds from then (ACPI G2 soft-off,
then G3) before it is gone. So the notice's deadline is the moment we saw it plus
:data:`PREEMPTION_NOTICE_S`. Polling once a second would lose up to a second of 30;
instead each value is watched with ``?wait_for_change=true&last_etag=<etag>``, which
the server answers the moment the value changes.

A hanging GET must never hold up anything else: it runs on the source's own thread, and
:meth:`poll` (what the watcher calls) only reads what that thread last saw, so the
watcher's rounds and its stop never wait for the network. A dropped connection is
retried at once; other failures (5xx, refused, a body that is neither ``TRUE`` nor
``FALSE``) after a short pause, and :meth:`poll` reports them as
:class:`~daemon.notices.imds.MetadataUnavailable` until the next answer, so the
watcher counts and logs them as it does for AWS.

``maintenance-event`` turning ``TERMINATE_ON_HOST_MAINTENANCE`` means the host is going
down for maintenance and the VM with it (GPU VMs cannot live-migrate): a notice of kind
``rebalance`` asks the trainer for a checkpoint now (SIGUSR1) and training goes on; the
stop itself reaches the supervisor later as the OS shutdown. ``MIGRATE_ON_HOST_MAINTENANCE``
needs nothing.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from urllib.parse import quote

import structlog

from daemon.notices.base import Clock, Notice, format_utc, notice_id, utc_now
from daemon.notices.metadata_http import MappedMetadata, MetadataDropped, MetadataHttp
from daemon.notices.poller import MetadataThread
from daemon.notices.wire import MetadataUnavailable

log = structlog.get_logger(__name__)

GCP_METADATA_SOURCE = "gcp-metadata"
"""``Notice.source`` of everything read from the GCE metadata server."""

DEFAULT_URL = "http://metadata.google.internal"
FLAVOR_HEADER = {"Metadata-Flavor": "Google"}
PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
MAINTENANCE_EVENT_PATH = "/computeMetadata/v1/instance/maintenance-event"
INSTANCE_ID_PATH = "/computeMetadata/v1/instance/id"
INSTANCE_NAME_PATH = "/computeMetadata/v1/instance/name"

PREEMPTION_NOTICE_S = 30.0
"""From ``preempted`` turning TRUE to the VM's power-off (GCE's documented 30 s)."""

HANG_S = 60
"""``timeout_sec`` of each hanging GET: the server answers by then even without change."""

DROPS_BEFORE_PAUSE = 3
"""Dropped connections retried at once in a row before a pause (a server dropping every
request at once must not make the thread spin)."""


class HangingWatch(MetadataThread):
    """One metadata value, followed on a daemon thread: a plain GET for the value and its
    ETag, then hanging GETs with ``last_etag`` (answered at once when the ETag is not
    the current one, so a wrong or stale ETag costs one request, never a miss).

    ``valid`` checks each value (a value it refuses counts as a failure). ``on_value``
    is called on the thread with every value answered, before it is published.
    """

    def __init__(
        self,
        base_url: str,
        path: str,
        *,
        valid: Callable[[str], bool] = lambda _v: True,
        retry_pause: float = 1.0,
        hang_s: int = HANG_S,
        connect_timeout: float = 0.5,
    ) -> None:
        super().__init__(
            MetadataHttp(base_url, FLAVOR_HEADER, connect_timeout=connect_timeout),
            f"gcp-watch{path.rsplit('/', 1)[-1]}",
        )
        self.path = path
        self._valid = valid
        self._retry_pause = retry_pause
        self._hang_s = hang_s
        self._value: str | None = None
        self._since: dt.datetime | None = None  # when the value last changed, as seen here
        self._etag: str | None = None
        self._error: MetadataUnavailable | None = None
        self.answers = 0
        self.drops = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> HangingWatch:
        self._start_thread()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Stop: the hanging GET under way is cut off at once (its socket shut down)."""
        self._stop_thread(timeout)

    # -- what the thread saw ----------------------------------------------------------------

    def latest(self) -> tuple[str | None, dt.datetime | None, MetadataUnavailable | None]:
        """The newest value (None before the first answer), when this thread first saw it,
        and the failure since, if any."""
        with self._lock:
            return self._value, self._since, self._error

    def wait_for(self, pred: Callable[[str | None], bool], timeout: float) -> bool:
        """Block until ``pred(value)`` (tests and the demo)."""
        return self._wait_until(lambda: pred(self._value), timeout)

    # -- the thread -------------------------------------------------------------------------

    def _url(self) -> str:
        if self._etag is None:
            return self.path  # the first GET: the value now, and its ETag
        return (
            f"{self.path}?wait_for_change=true&last_etag={quote(self._etag, safe='')}"
            f"&timeout_sec={self._hang_s}"
        )

    def _run(self) -> None:
        drops = 0
        quick_run = 0
        while not self._stop.is_set():
            hanging = self._etag is not None
            sent = time.monotonic()
            try:
                answer = self._http.request(
                    "GET",
                    self._url(),
                    # The server holds a hanging GET up to timeout_sec: wait a bit longer.
                    read_timeout=self._hang_s + 10.0 if hanging else 2.0,
                )
                if answer.status != 200:
                    raise MetadataUnavailable(
                        self.path, f"HTTP {answer.status}", status=answer.status
                    )
                value = answer.body.strip()
                if not self._valid(value):
                    raise MetadataUnavailable(
                        self.path, f"unexpected value {value[:40]!r}", status=200
                    )
            except MetadataDropped as exc:
                if self._stop.is_set():
                    return
                self.drops += 1
                drops += 1
                log.info("gcp_metadata_dropped", path=self.path, error=str(exc), drops=drops)
                if drops >= DROPS_BEFORE_PAUSE:
                    self._failed(exc)
                    self._stop.wait(self._retry_pause)
                continue  # at once: a dropped hanging GET may have been cut by a proxy
            except MetadataUnavailable as exc:
                if self._stop.is_set():
                    return
                self._failed(exc)
                if hanging and exc.status is not None:
                    # An ETag the server no longer knows may be what it refuses: start over.
                    self._etag = None
                self._stop.wait(self._retry_pause)
                continue
            drops = 0
            etag = answer.headers.get("etag")
            # Answered at once without a change: our ETag was not the server's. Once is
            # normal (a stale ETag); again and again means its ETags do not hold still
            # (or it sends none): pause between requests rather than spin.
            quick = hanging and value == self._value and time.monotonic() - sent < 0.5
            quick_run = quick_run + 1 if quick else 0
            self._etag = etag or None
            self.answers += 1
            with self._changed:
                if value != self._value:
                    self._since = utc_now()
                self._value = value
                self._error = None
                self._changed.notify_all()
            if quick_run >= 2 or (self._etag is None and not self._stop.is_set()):
                self._stop.wait(self._retry_pause)

    def _failed(self, exc: MetadataUnavailable) -> None:
        with self._lock:
            self._error = exc


def _is_bool(value: str) -> bool:
    return value in ("TRUE", "FALSE")


class GcpPreemptionSource:
    """``instance/preempted``: an interruption whose deadline is detection + 30 s."""

    name = "gcp-preempted"

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        retry_pause: float = 1.0,
        hang_s: int = HANG_S,
        clock: Clock = utc_now,
    ) -> None:
        self.watch = HangingWatch(
            base_url, PREEMPTED_PATH, valid=_is_bool, retry_pause=retry_pause, hang_s=hang_s
        )
        self._clock = clock
        self._detected: dt.datetime | None = None

    def poll(self) -> list[Notice]:
        """The preemption, once the thread has seen ``TRUE``; never waits for the network."""
        self.watch.start()
        value, since, error = self.watch.latest()
        if value == "TRUE":
            if self._detected is None:
                self._detected = since or self._clock()
            when = self._detected
            deadline = when + dt.timedelta(seconds=PREEMPTION_NOTICE_S)
            return [
                Notice(
                    id=notice_id(GCP_METADATA_SOURCE, "interruption", "preempt", format_utc(when)),
                    kind="interruption",
                    action="preempt",
                    deadline=deadline,
                    source=GCP_METADATA_SOURCE,
                    raw={"preempted": value, "detected_at": format_utc(when)},
                )
            ]
        if value == "FALSE":
            self._detected = None
        if error is not None:
            raise error
        return []

    def close(self) -> None:
        self.watch.stop()


class GcpMaintenanceSource:
    """``instance/maintenance-event``: ``TERMINATE_ON_HOST_MAINTENANCE`` asks for a
    checkpoint (kind ``rebalance``: SIGUSR1, training goes on)."""

    name = "gcp-maintenance"

    def __init__(
        self, base_url: str = DEFAULT_URL, *, retry_pause: float = 1.0, clock: Clock = utc_now
    ) -> None:
        self.watch = HangingWatch(base_url, MAINTENANCE_EVENT_PATH, retry_pause=retry_pause)
        self._clock = clock
        self._since: tuple[str, dt.datetime] | None = None

    def poll(self) -> list[Notice]:
        self.watch.start()
        value, since, error = self.watch.latest()
        if value is not None and value.startswith("TERMINATE"):
            if self._since is None or self._since[0] != value:
                self._since = (value, since or self._clock())
            when = self._since[1]
            return [
                Notice(
                    id=notice_id(GCP_METADATA_SOURCE, "rebalance", value, format_utc(when)),
                    kind="rebalance",
                    action=value,
                    deadline=when,
                    source=GCP_METADATA_SOURCE,
                    raw={"maintenance-event": value},
                )
            ]
        if value is not None:
            self._since = None  # NONE, MIGRATE_ON_HOST_MAINTENANCE: nothing to do
        if error is not None:
            raise error
        return []

    def close(self) -> None:
        self.watch.stop()


def _last_segment(text: str) -> str:
    return text.rsplit("/", 1)[-1]


def _region_of_zone(text: str) -> str:
    return _last_segment(text).rsplit("-", 1)[0]


def _lifecycle(text: str) -> str:
    return "spot" if text.upper() in ("SPOT", "TRUE") else "on-demand"


class GcpIdentity(MappedMetadata):
    """This instance's facts from the GCE metadata server (plain GETs), asked by their
    EC2 paths: the instance id (its name in leases, see
    :func:`daemon.nodes.instance_identity`), machine type, zone, region and whether it is
    spot (for the run ledger). Any other path: None."""

    def __init__(self, base_url: str = DEFAULT_URL) -> None:
        # The EC2 items callers ask (daemon.nodes, daemon.ledger), from GCE's items.
        super().__init__(
            base_url,
            FLAVOR_HEADER,
            instance_id=(INSTANCE_ID_PATH, str),
            instance_type=("/computeMetadata/v1/instance/machine-type", _last_segment),
            availability_zone=("/computeMetadata/v1/instance/zone", _last_segment),
            region=("/computeMetadata/v1/instance/zone", _region_of_zone),
            lifecycle=("/computeMetadata/v1/instance/scheduling/provisioning-model", _lifecycle),
        )


__all__ = [
    "DEFAULT_URL",
    "GCP_METADATA_SOURCE",
    "INSTANCE_ID_PATH",
    "MAINTENANCE_EVENT_PATH",
    "PREEMPTED_PATH",
    "PREEMPTION_NOTICE_S",
    "GcpIdentity",
    "GcpMaintenanceSource",
    "GcpPreemptionSource",
    "HangingWatch",
]
