"""What every notice source produces: one :class:`Notice` type behind the two-member
:class:`NoticeSource` interface (``name``, ``poll()``), and the time helpers they share.

A notice's ``id`` is a hash of what the cloud said (source, kind, action, time as
given), so polling the same notice again yields the same id and the watcher delivers
it once. Nothing here talks to a cloud: each source lives in a module of its own
(:mod:`daemon.notices.aws`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

NoticeKind = Literal["interruption", "rebalance", "maintenance"]

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    """Now, as an aware UTC datetime."""
    return dt.datetime.now(dt.timezone.utc)


def format_utc(t: dt.datetime) -> str:
    """ISO 8601 UTC with a ``Z``, second precision (the notice file's form)."""
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def notice_id(source: str, kind: str, action: str, when: str) -> str:
    """A stable id: the same notice polled twice hashes the same."""
    digest = hashlib.sha256(f"{source}\x00{kind}\x00{action}\x00{when}".encode()).hexdigest()
    return digest[:16]


@dataclass(frozen=True)
class Notice:
    """A warning that the instance (and so the trainer) is going away.

    ``deadline`` is when the cloud acts (aware UTC); a notice that gives no usable
    time, or a past one, gets "now": act at once. ``raw`` is what the cloud sent,
    parsed, for the logs; it takes no part in equality.
    """

    id: str
    kind: NoticeKind
    action: str
    deadline: dt.datetime
    source: str
    raw: Any = field(default=None, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for state.json and events."""
        return {
            "id": self.id,
            "kind": self.kind,
            "action": self.action,
            "deadline": format_utc(self.deadline),
            "source": self.source,
        }

    def notice_file_payload(self) -> dict[str, str]:
        """What the supervisor writes to ``$SPOT_NOTICE_FILE`` (CONTRACT §3)."""
        return {"action": self.action, "deadline": format_utc(self.deadline), "source": self.source}


class NoticeSource(Protocol):
    """Where notices come from. ``poll()`` returns the notices present now (often none).

    ``poll`` raises :class:`~daemon.notices.imds.MetadataUnavailable` when it cannot tell:
    the service did not answer, or answered something that does not parse. An empty
    list means "asked, and there is nothing".
    """

    name: str

    def poll(self) -> list[Notice]: ...


class TextMetadata(Protocol):
    """A metadata service that answers plain items (the instance id) by path: what
    :func:`daemon.nodes.instance_identity` asks. ``None`` when the item does not exist;
    :class:`~daemon.notices.imds.MetadataUnavailable` when the service cannot tell."""

    def get_text(self, path: str) -> str | None: ...


PROVIDER_NOTICE_S = {"aws": 120.0, "gcp": 30.0, "azure": 30.0}
"""How long before the machine goes a cloud's interruption notice comes: AWS's two-minute
spot warning, GCE's 30 s preemption (ACPI soft-off to power-off), Azure's 30 s minimum
``NotBefore`` of a spot eviction."""


def parse_iso_utc(value: str) -> dt.datetime | None:
    """``2026-11-28T09:02:00Z`` (or with an offset) as aware UTC; None if unparseable."""
    try:
        t = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)  # AWS times are UTC
    return t.astimezone(dt.timezone.utc)


def deadline_or_now(when: dt.datetime | None, now: dt.datetime) -> dt.datetime:
    # No usable time, or one already past: the cloud is acting now.
    return now if when is None or when < now else when
