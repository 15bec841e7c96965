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

The package, one job a module: :mod:`.service` (:class:`MetadataEmulator`: lifecycle,
faults, counters), :mod:`.server` (the HTTP core), :mod:`.tokens` (IMDSv2 tokens),
:mod:`.aws` (the EC2 paths), :mod:`.gce` (the GCE mode), :mod:`.azure` (the Azure
Scheduled Events mode), :mod:`.faults`, :mod:`.stats`, :mod:`.times` (the clouds' time
formats), :mod:`.control` and :mod:`.client` (the HTTP control API, both sides),
:mod:`.cli` (the command line).
"""

from daemon.standins.emulator.aws import (
    DEFAULT_NOTICE_LEAD_S,
    IDENTITY_DOCUMENT_PATH,
    SPOT_ACTIONS,
    scheduled_event,
)
from daemon.standins.emulator.azure import (
    AZURE_COMPUTE_PREFIX,
    AZURE_EVENT_TYPES,
    AZURE_EVENTS_PATH,
    azure_event,
)
from daemon.standins.emulator.cli import main
from daemon.standins.emulator.client import EmulatorControl
from daemon.standins.emulator.control import (
    CONTROL_AZURE_APPROVALS_PATH,
    CONTROL_AZURE_EVENTS_PATH,
    CONTROL_FAULT_PATH,
    CONTROL_GCP_PATH,
    CONTROL_NOTICE_PATH,
    CONTROL_REBALANCE_PATH,
    CONTROL_SCHEDULED_PATH,
    CONTROL_STATS_PATH,
    CONTROL_TOKENS_EXPIRE_PATH,
)
from daemon.standins.emulator.faults import DEFAULT_MALFORMED_BODY, FAULT_KINDS, Fault
from daemon.standins.emulator.gce import (
    GCP_DEFAULT_HANG_S,
    GCP_MAINTENANCE_EVENT,
    GCP_PREEMPTED,
    GCP_PREFIX,
)
from daemon.standins.emulator.server import CONTROL_PREFIX
from daemon.standins.emulator.service import PROVIDERS, MetadataEmulator
from daemon.standins.emulator.stats import EmulatorStats
from daemon.standins.emulator.times import format_event_time, format_iso

__all__ = [
    "AZURE_COMPUTE_PREFIX",
    "AZURE_EVENTS_PATH",
    "AZURE_EVENT_TYPES",
    "CONTROL_AZURE_APPROVALS_PATH",
    "CONTROL_AZURE_EVENTS_PATH",
    "CONTROL_FAULT_PATH",
    "CONTROL_GCP_PATH",
    "CONTROL_NOTICE_PATH",
    "CONTROL_PREFIX",
    "CONTROL_REBALANCE_PATH",
    "CONTROL_SCHEDULED_PATH",
    "CONTROL_STATS_PATH",
    "CONTROL_TOKENS_EXPIRE_PATH",
    "DEFAULT_MALFORMED_BODY",
    "DEFAULT_NOTICE_LEAD_S",
    "FAULT_KINDS",
    "GCP_DEFAULT_HANG_S",
    "GCP_MAINTENANCE_EVENT",
    "GCP_PREEMPTED",
    "GCP_PREFIX",
    "IDENTITY_DOCUMENT_PATH",
    "PROVIDERS",
    "SPOT_ACTIONS",
    "EmulatorControl",
    "EmulatorStats",
    "Fault",
    "MetadataEmulator",
    "azure_event",
    "format_event_time",
    "format_iso",
    "main",
    "scheduled_event",
]
