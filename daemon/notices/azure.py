"""The Azure source: Scheduled Events from the Instance Metadata Service, polled every
second from boot on a thread of its own, and the approval of an event once the
emergency checkpoint is committed.

``GET /metadata/scheduledevents?api-version=2020-07-01`` (header ``Metadata: true``)
answers ``{"DocumentIncarnation": N, "Events": [...]}``. The first call after boot may
take up to two minutes while the service enables itself for the VM: the poller's thread
waits it out (:data:`FIRST_CALL_TIMEOUT_S`), and :meth:`AzureEventsSource.poll`, which the
watcher calls, never waits for the network; it reports what the thread last saw.

For events whose ``Resources`` name this VM (its name from
``metadata/instance/compute/name``):

- ``Preempt`` (spot eviction, about 30 s ahead) and ``Terminate`` (a deletion, after
  the scale set's termination notice): an interruption, deadline ``NotBefore`` (now when
  it is empty or past, or the event has ``Started``).
- ``Reboot``, ``Redeploy``, ``Freeze``: a notice of kind ``rebalance``: a checkpoint now
  (SIGUSR1), training goes on; a reboot or redeploy then reaches the supervisor as the OS
  shutdown.

Approving an event (``POST`` with ``{"StartRequests": [{"EventId": ...}]}``) lets Azure
go ahead at once instead of at ``NotBefore``. It is only ever done after the emergency
commit (:meth:`AzureEventsSource.approve_after_commit`), never before: approved early, the
VM could go with the checkpoint half uploaded.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any

import structlog

from daemon.notices.aws import parse_event_time
from daemon.notices.base import Clock, Notice, deadline_or_now, notice_id, utc_now
from daemon.notices.metadata_http import MappedMetadata, MetadataHttp
from daemon.notices.poller import MetadataThread
from daemon.notices.wire import MetadataUnavailable

log = structlog.get_logger(__name__)

AZURE_EVENTS_SOURCE = "azure-scheduled-events"
"""``Notice.source`` of everything read from Scheduled Events."""

DEFAULT_URL = "http://169.254.169.254"
METADATA_HEADER = {"Metadata": "true"}
EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
VM_NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
VM_ID_PATH = "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text"

INTERRUPTING_TYPES = frozenset({"Preempt", "Terminate"})
CHECKPOINT_TYPES = frozenset({"Reboot", "Redeploy", "Freeze"})
PREEMPT_NOTICE_S = 30.0
"""A spot eviction's ``NotBefore`` is at least this far ahead (Azure's minimum)."""

FIRST_CALL_TIMEOUT_S = 150.0
"""The first call may take up to two minutes while Scheduled Events enables itself."""
CALL_TIMEOUT_S = 5.0
APPROVE_TIMEOUT_S = 2.0


@dataclass
class _Seen:
    """What the poller's thread last saw."""

    events: list[dict[str, Any]] | None = None  # None: no answer yet
    incarnation: int | None = None
    error: MetadataUnavailable | None = None
    enabled_after_s: float | None = None


class AzureEventsSource(MetadataThread):
    """Scheduled Events for this VM, polled every ``poll_interval`` on a daemon thread."""

    name = "azure-events"

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        poll_interval: float = 1.0,
        vm_name: str | None = None,
        first_call_timeout: float = FIRST_CALL_TIMEOUT_S,
        clock: Clock = utc_now,
    ) -> None:
        super().__init__(
            MetadataHttp(base_url, METADATA_HEADER, read_timeout=CALL_TIMEOUT_S), "azure-events"
        )
        self._base_url = base_url
        self.poll_interval = poll_interval
        self._first_call_timeout = first_call_timeout
        self._clock = clock
        self._seen = _Seen()
        self.vm_name = vm_name
        self._name_warned = False
        # Interrupting events delivered for this VM, by EventId: what approval approves.
        self._delivered: dict[str, dict[str, Any]] = {}
        self.approved: list[str] = []

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> AzureEventsSource:
        """Start polling (from boot: the first call enables the service)."""
        self._start_thread()
        return self

    def close(self, timeout: float = 1.0) -> None:
        """Stop; a call under way (the slow first one too) is cut off at once."""
        self._stop_thread(timeout)

    def wait_answered(self, timeout: float) -> bool:
        """Block until the first answer (tests and the demo)."""
        return self._wait_until(lambda: self._seen.events is not None, timeout)

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        started = time.monotonic()
        first = True
        while not self._stop.is_set():
            t0 = time.monotonic()
            if self.vm_name is None:
                self._learn_vm_name()
            try:
                answer = self._http.request(
                    "GET",
                    EVENTS_PATH,
                    read_timeout=self._first_call_timeout if first else CALL_TIMEOUT_S,
                )
                if answer.status != 200:
                    raise MetadataUnavailable(
                        EVENTS_PATH, f"HTTP {answer.status}", status=answer.status
                    )
                incarnation, events = parse_document(answer.body)
            except MetadataUnavailable as exc:
                if self._stop.is_set():
                    return
                with self._lock:
                    self._seen.error = exc
            else:
                with self._changed:
                    if first:
                        self._seen.enabled_after_s = round(time.monotonic() - started, 3)
                        log.info(
                            "azure_events_enabled",
                            seconds=self._seen.enabled_after_s,
                            vm_name=self.vm_name,
                        )
                    first = False
                    self._seen.events = events
                    self._seen.incarnation = incarnation
                    self._seen.error = None
                    self._changed.notify_all()
            self._stop.wait(max(0.0, self.poll_interval - (time.monotonic() - t0)))

    def _learn_vm_name(self) -> None:
        http = MetadataHttp(self._base_url, METADATA_HEADER, read_timeout=CALL_TIMEOUT_S)
        try:
            answer = http.request("GET", VM_NAME_PATH)
            if answer.status == 200 and answer.body.strip():
                self.vm_name = answer.body.strip()
                log.info("azure_vm_name", vm_name=self.vm_name)
                return
            why = f"HTTP {answer.status}"
        except MetadataUnavailable as exc:
            why = str(exc)
        finally:
            http.close()
        if not self._name_warned:
            self._name_warned = True
            log.warning(
                "azure_vm_name_unknown",
                error=why,
                consequence="every event is taken as this VM's until its name is known",
            )

    # -- NoticeSource -----------------------------------------------------------------------

    def poll(self) -> list[Notice]:
        """This VM's events as the thread last saw them; never waits for the network."""
        self.start()
        with self._lock:
            events, error = self._seen.events, self._seen.error
        if events is None:
            if error is not None:
                raise error
            return []  # the first call is still under way (the service enabling itself)
        now = self._clock()
        notices = []
        for event in events:
            notice = self._notice(event, now)
            if notice is not None:
                notices.append(notice)
        if error is not None and not notices:
            raise error
        return notices

    def _ours(self, event: dict[str, Any]) -> bool:
        resources = event.get("Resources")
        if self.vm_name is None or not isinstance(resources, list):
            return True  # unknown: acting on someone else's event costs a checkpoint
        return self.vm_name in resources

    def _notice(self, event: dict[str, Any], now: dt.datetime) -> Notice | None:
        kind_of = str(event.get("EventType", ""))
        event_id = str(event.get("EventId", ""))
        if not self._ours(event):
            return None
        not_before = str(event.get("NotBefore") or "")
        when = parse_event_time(not_before) if not_before else None
        if str(event.get("EventStatus", "")) == "Started":
            when = None  # under way: act now
        if kind_of in INTERRUPTING_TYPES:
            with self._lock:
                self._delivered[event_id] = event
            action = "preempt" if kind_of == "Preempt" else "terminate"
            return Notice(
                id=notice_id(
                    AZURE_EVENTS_SOURCE, "interruption", kind_of, f"{event_id}|{not_before}"
                ),
                kind="interruption",
                action=action,
                deadline=deadline_or_now(when, now),
                source=AZURE_EVENTS_SOURCE,
                raw=event,
            )
        if kind_of in CHECKPOINT_TYPES:
            return Notice(
                id=notice_id(AZURE_EVENTS_SOURCE, "rebalance", kind_of, f"{event_id}|{not_before}"),
                kind="rebalance",
                action=kind_of,
                deadline=deadline_or_now(when, now),
                source=AZURE_EVENTS_SOURCE,
                raw=event,
            )
        return None

    # -- approval ---------------------------------------------------------------------------

    def approve_after_commit(self, committed: bool) -> list[str]:
        """After the emergency commit: approve this VM's Preempt/Terminate events, so Azure
        need not wait for ``NotBefore``. Nothing when the commit did not happen (the event
        then comes at its time). The EventIds approved; bounded (about 2 s a request), so
        the supervisor can call it off its main loop just before it exits."""
        with self._lock:
            pending = [e for e in self._delivered if e not in self.approved]
        if not pending:
            return []
        if not committed:
            log.warning(
                "azure_event_not_approved",
                event_ids=pending,
                why="the emergency checkpoint was not committed; the event comes at NotBefore",
            )
            return []
        body = json.dumps({"StartRequests": [{"EventId": e} for e in pending]}).encode()
        http = MetadataHttp(self._base_url, METADATA_HEADER, read_timeout=APPROVE_TIMEOUT_S)
        try:
            for attempt in (1, 2):
                try:
                    answer = http.request("POST", EVENTS_PATH, body)
                except MetadataUnavailable as exc:
                    error = str(exc)
                else:
                    if answer.status == 200:
                        self.approved.extend(pending)
                        log.info("azure_event_approved", event_ids=pending)
                        return pending
                    error = f"HTTP {answer.status}: {answer.body[:200]}"
                log.warning(
                    "azure_event_approve_failed", event_ids=pending, attempt=attempt, error=error
                )
        finally:
            http.close()
        return []


def parse_document(text: str) -> tuple[int | None, list[dict[str, Any]]]:
    """``(DocumentIncarnation, Events)``; MetadataUnavailable when it is not that shape."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise MetadataUnavailable(
            EVENTS_PATH, f"malformed JSON ({exc}): {text[:80]!r}", status=200
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Events", []), list):
        raise MetadataUnavailable(
            EVENTS_PATH, f"not a Scheduled Events document: {text[:80]!r}", status=200
        )
    events = doc.get("Events", [])
    if not all(isinstance(e, dict) for e in events):
        raise MetadataUnavailable(EVENTS_PATH, "an event is not an object", status=200)
    incarnation = doc.get("DocumentIncarnation")
    return (incarnation if isinstance(incarnation, int) else None), events


def _compute(item: str) -> str:
    return f"/metadata/instance/compute/{item}?api-version=2021-02-01&format=text"


def _priority_lifecycle(priority: str) -> str:
    return "spot" if priority.lower() in ("spot", "low") else "on-demand"


class AzureIdentity(MappedMetadata):
    """This VM's facts from the Instance Metadata Service, asked by their EC2 paths: the
    VM id (its name in leases, see :func:`daemon.nodes.instance_identity`), size, zone,
    region and whether it is spot (for the run ledger). Any other path: None."""

    def __init__(self, base_url: str = DEFAULT_URL) -> None:
        # The EC2 items callers ask (daemon.nodes, daemon.ledger), from IMDS compute items.
        super().__init__(
            base_url,
            METADATA_HEADER,
            instance_id=(VM_ID_PATH, str),
            instance_type=(_compute("vmSize"), str),
            availability_zone=(_compute("zone"), str),
            region=(_compute("location"), str),
            lifecycle=(_compute("priority"), _priority_lifecycle),
        )


__all__ = [
    "AZURE_EVENTS_SOURCE",
    "CHECKPOINT_TYPES",
    "DEFAULT_URL",
    "EVENTS_PATH",
    "INTERRUPTING_TYPES",
    "VM_ID_PATH",
    "VM_NAME_PATH",
    "AzureEventsSource",
    "AzureIdentity",
    "parse_document",
]
