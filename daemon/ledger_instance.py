"""What the boot event says about the machine: the instance's facts from the metadata
service, and how long the host has been up.

Read on the ledger's own thread (:class:`daemon.ledger_writer.RunLedger` builds the boot
line there), never on the supervisor's: each lookup is a request that may be slow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from daemon.ledger_format import parse_time

log = structlog.get_logger(__name__)

# The metadata service's paths for the boot event (IMDSv2; daemon.notices.imds serves them).
META_INSTANCE_ID = "/latest/meta-data/instance-id"
META_INSTANCE_TYPE = "/latest/meta-data/instance-type"
META_AVAILABILITY_ZONE = "/latest/meta-data/placement/availability-zone"
META_LIFECYCLE = "/latest/meta-data/instance-life-cycle"
META_IDENTITY_DOCUMENT = "/latest/dynamic/instance-identity/document"


class MetadataReader(Protocol):
    """The metadata service, as :class:`daemon.notices.imds.ImdsClient` serves it."""

    def get_text(self, path: str) -> str | None: ...


@dataclass(frozen=True)
class InstanceFacts:
    """What the boot event says about the machine; None where unknown."""

    instance_id: str | None = None
    instance_type: str | None = None
    availability_zone: str | None = None
    lifecycle: str | None = None
    # When the instance launched (AWS: the identity document's pendingTime): billing
    # starts there, before the supervisor does.
    launched_at: str | None = None


def instance_facts(metadata: MetadataReader) -> InstanceFacts:
    """The instance's id, type, zone and lifecycle from the metadata service.

    Blocking (four requests, each bounded by the client's timeouts); a value the
    service does not give (404, an error, a service that is not there) is None.
    """

    def get(path: str) -> str | None:
        try:
            text = metadata.get_text(path)
        except Exception as exc:  # MetadataUnavailable, or anything a stand-in raises
            log.debug("ledger_metadata_unavailable", path=path, error=str(exc))
            return None
        return text.strip() or None if text is not None else None

    return InstanceFacts(
        instance_id=get(META_INSTANCE_ID),
        instance_type=get(META_INSTANCE_TYPE),
        availability_zone=get(META_AVAILABILITY_ZONE),
        lifecycle=get(META_LIFECYCLE),
        launched_at=_pending_time(get(META_IDENTITY_DOCUMENT)),
    )


def _pending_time(document: str | None) -> str | None:
    """``pendingTime`` of the instance identity document (None if absent or garbled)."""
    if document is None:
        return None
    try:
        doc = json.loads(document)
    except ValueError:
        return None
    value = doc.get("pendingTime") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and parse_time(value) is not None else None


def host_uptime_s(path: Path = Path("/proc/uptime")) -> float | None:
    """Seconds since this machine booted (Linux), None where that cannot be read."""
    try:
        return round(float(path.read_text().split()[0]), 3)
    except (OSError, ValueError, IndexError):
        return None
