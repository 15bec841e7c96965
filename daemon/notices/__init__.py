"""Where notices come from: one module per source, one Notice type for all.

* :mod:`daemon.notices.base`: :class:`Notice`, the :class:`NoticeSource` interface
  (``name``, ``poll()``) and the time helpers every source shares.
* :mod:`daemon.notices.aws`: the EC2 metadata service's spot notice, rebalance
  recommendation and scheduled events; :mod:`daemon.notices.imds` is its IMDSv2 client.
* :mod:`daemon.notices.gcp`: the GCE metadata server's ``preempted`` and
  ``maintenance-event``, each followed by hanging GETs on a thread of its own.
* :mod:`daemon.notices.azure`: Azure Scheduled Events, polled on a thread of its own,
  and the approval of an event after the emergency commit.
* :mod:`daemon.notices.watch`: the thread that polls the sources and delivers each new
  notice once.
* The clients under them: :mod:`daemon.notices.wire` (what every metadata client shares:
  the URL rule, :class:`~daemon.notices.wire.MetadataUnavailable`, the bounded connect
  and read), :mod:`daemon.notices.metadata_http` (GCP's and Azure's plain client) and
  :mod:`daemon.notices.poller` (a value followed on a thread of its own).
* :func:`build_sources`: the sources of ``imds.provider``, and what else the supervisor
  needs of that cloud's metadata service, in one :class:`NoticeSources`.

A new cloud is one more module producing :class:`Notice` behind :class:`NoticeSource`
(see docs/architecture.md). What must not live here: what a notice *means* (that is
:mod:`daemon.policy`), and any action on the trainer or storage.
"""

from daemon.notices.aws import (
    AWS_IMDS_SOURCE,
    INTERRUPTING_EVENT_CODES,
    AwsMaintenanceSource,
    AwsRebalanceSource,
    AwsSpotSource,
    event_key,
    parse_event_time,
    parse_instance_action,
)
from daemon.notices.base import (
    PROVIDER_NOTICE_S,
    Notice,
    NoticeKind,
    NoticeSource,
    TextMetadata,
    format_utc,
    notice_id,
    parse_iso_utc,
    utc_now,
)
from daemon.notices.sources import NoticeSources, build_sources

__all__ = [
    "AWS_IMDS_SOURCE",
    "INTERRUPTING_EVENT_CODES",
    "PROVIDER_NOTICE_S",
    "AwsMaintenanceSource",
    "AwsRebalanceSource",
    "AwsSpotSource",
    "Notice",
    "NoticeKind",
    "NoticeSource",
    "NoticeSources",
    "TextMetadata",
    "build_sources",
    "event_key",
    "format_utc",
    "notice_id",
    "parse_event_time",
    "parse_instance_action",
    "parse_iso_utc",
    "utc_now",
]
