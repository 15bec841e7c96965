"""The notice sources of one cloud, chosen by ``imds.provider``: :func:`build_sources`.

What the supervisor needs of a cloud's metadata service is more than its sources, and
differs per cloud in what it costs; one :class:`NoticeSources` carries all of it, so the
supervisor's wiring is one call:

========  ==========================================  =================  ==========
provider  sources (polled every N watcher rounds)      instance id        notice
========  ==========================================  =================  ==========
aws       spot/instance-action (1), rebalance (5),     instance-id        120 s
          maintenance/scheduled (5); IMDSv2
gcp       instance/preempted, instance/maintenance-    instance/id        30 s
          event: hanging GETs, each on its own thread
azure     Scheduled Events, polled every               compute/vmId       30 s
          ``imds.poll_interval`` on its own thread
========  ==========================================  =================  ==========

The GCP and Azure sources do their HTTP on threads of their own, started here (Azure's
first call may take minutes: it starts at boot); their ``poll()`` only reads what the
thread saw, so the watcher's rounds and its stop never wait for the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from daemon.notices.aws import AwsMaintenanceSource, AwsRebalanceSource, AwsSpotSource
from daemon.notices.base import PROVIDER_NOTICE_S, NoticeSource, TextMetadata

if TYPE_CHECKING:
    from daemon.config import Config

log = structlog.get_logger(__name__)


class ScheduledEvents(Protocol):
    """Which scheduled maintenance events stand (see :mod:`daemon.maintenance`)."""

    def active_event_ids(self) -> frozenset[str] | None: ...


class _NoScheduledEvents:
    """GCP and Azure send no notice of kind ``maintenance`` (theirs ask for a checkpoint
    at once, as kind ``rebalance``): nothing is ever scheduled."""

    def active_event_ids(self) -> frozenset[str] | None:
        return frozenset()


@dataclass
class NoticeSources:
    """One cloud's notice sources and the rest of what the supervisor asks its metadata
    service.

    ``watched`` goes to :class:`~daemon.notices.watch.NoticeWatcher` as its sources,
    ``request_counter`` as its request counter. ``metadata`` answers
    :func:`daemon.nodes.instance_identity`. ``maintenance`` says which scheduled events
    stand (AWS only). ``notice_s`` is how long this cloud's interruption notice gives
    (:mod:`daemon.budget`). Call :meth:`after_emergency_commit` once the emergency
    commit is done (Azure approves the event then), and :meth:`close` after the watcher
    stopped.
    """

    provider: str
    watched: list[NoticeSource | tuple[NoticeSource, int]]
    metadata: TextMetadata
    maintenance: ScheduledEvents
    notice_s: float
    request_counter: Callable[[], int]
    _after_commit: Callable[[bool], object] = field(default=lambda _c: None, repr=False)
    _closers: Sequence[Callable[[], None]] = field(default=(), repr=False)

    def after_emergency_commit(self, committed: bool) -> None:
        """After the drain's emergency commit (``committed``: the newest local checkpoint
        is in storage). Azure: approve this VM's Preempt/Terminate event, never before.
        Bounded (a few seconds at most) but network I/O: call it off the main loop."""
        self._after_commit(committed)

    def close(self) -> None:
        """Stop the sources' own threads; a hanging request is cut off at once."""
        for close in self._closers:
            close()


def build_sources(cfg: Config) -> NoticeSources:
    """The notice sources of ``cfg.imds.provider``, on ``cfg.imds.url``."""
    provider = cfg.imds.provider
    url = cfg.imds.url
    if provider == "gcp":
        from daemon.notices.gcp import GcpIdentity, GcpMaintenanceSource, GcpPreemptionSource

        pause = min(1.0, cfg.imds.poll_interval)
        preempted = GcpPreemptionSource(url, retry_pause=pause)
        maintenance = GcpMaintenanceSource(url, retry_pause=pause)
        preempted.watch.start()
        maintenance.watch.start()
        return NoticeSources(
            provider,
            [preempted, maintenance],
            GcpIdentity(url),
            _NoScheduledEvents(),
            PROVIDER_NOTICE_S[provider],
            lambda: preempted.watch.requests + maintenance.watch.requests,
            _closers=(preempted.close, maintenance.close),
        )
    if provider == "azure":
        from daemon.notices.azure import AzureEventsSource, AzureIdentity

        events = AzureEventsSource(url, poll_interval=cfg.imds.poll_interval).start()
        approve = cfg.azure.approve_after_commit

        def after_commit(committed: bool) -> object:
            if not approve:
                log.info("azure_event_approval_off", key="azure.approve_after_commit")
                return None
            return events.approve_after_commit(committed)

        return NoticeSources(
            provider,
            [events],
            AzureIdentity(url),
            _NoScheduledEvents(),
            PROVIDER_NOTICE_S[provider],
            lambda: events.requests,
            _after_commit=after_commit,
            _closers=(events.close,),
        )
    from daemon.notices.imds import ImdsClient

    client = ImdsClient(url, token_ttl=cfg.imds.token_ttl)
    scheduled = AwsMaintenanceSource(client)
    return NoticeSources(
        provider,
        # instance-action every poll; rebalance and maintenance are slower news: every 5th.
        [AwsSpotSource(client), (AwsRebalanceSource(client), 5), (scheduled, 5)],
        client,
        scheduled,
        PROVIDER_NOTICE_S[provider],
        lambda: client.stats.requests,
        _closers=(client.close,),
    )


__all__ = ["NoticeSources", "ScheduledEvents", "build_sources"]
