"""Where notices come from: one module per source, one Notice type for all.

* :mod:`daemon.notices.base`: :class:`Notice`, the :class:`NoticeSource` interface
  (``name``, ``poll()``) and the time helpers every source shares.
* :mod:`daemon.notices.aws`: the EC2 metadata service's spot notice, rebalance
  recommendation and scheduled events; :mod:`daemon.notices.imds` is its IMDSv2 client.
* :mod:`daemon.notices.watch`: the thread that polls the sources and delivers each new
  notice once.

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
    Notice,
    NoticeKind,
    NoticeSource,
    format_utc,
    notice_id,
    parse_iso_utc,
    utc_now,
)

__all__ = [
    "AWS_IMDS_SOURCE",
    "INTERRUPTING_EVENT_CODES",
    "AwsMaintenanceSource",
    "AwsRebalanceSource",
    "AwsSpotSource",
    "Notice",
    "NoticeKind",
    "NoticeSource",
    "event_key",
    "format_utc",
    "notice_id",
    "parse_event_time",
    "parse_instance_action",
    "parse_iso_utc",
    "utc_now",
]
