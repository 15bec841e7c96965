"""The run ledger: what every supervisor of a run did, one object per boot, in the run's storage.

A run lives through several instances (boots, notices, standby handoffs, several nodes).
To answer "what did spot cost me?" afterwards, each supervisor start (a *boot*) appends
its events to an object of its own::

    <remote>/<run.id>/ledger/<boot-id>.jsonl          the boot's events, one JSON per line
    <remote>/<run.id>/ledger/<boot-id>.<n>.jsonl      further segments of a long boot (n >= 1)

The boot id is ``<UTC start, %Y%m%dT%H%M%SZ>-<16 hex>``: listing order is boot order, and
no two boots share an object, so no instance ever writes another's (there is nothing to
lock, and a report can read the ledger while the run goes on). Object storage has no
append: the writer keeps the boot's lines in memory and rewrites the whole object on each
flush. An object holds at most ``max_segment_bytes`` (256 KiB); past that the writer
starts the next segment, so a boot that lives for weeks never rewrites megabytes, and
lines of a finished segment leave memory once written.

Every line is ``{"t": "<ISO 8601 UTC, milliseconds, Z>", "event": "<name>", ...fields}``.
The events and their fields (any field may be null when unknown; readers ignore
fields and events they do not know):

``boot``
    ``boot_id``, ``run_id``, ``version``; ``instance_id``, ``instance_type``,
    ``availability_zone``, ``lifecycle`` (``spot`` / ``on-demand``, from the metadata
    service's ``instance-life-cycle``); ``node_id``, ``slot``, ``nodes`` (run.nodes);
    ``price_usd_per_hour`` (the spot price, when the supervisor knows it);
    ``host_uptime_s`` (seconds since the machine booted: the report counts the instance
    from ``t - host_uptime_s``, since it is billed from before the supervisor starts).
``restore``
    ``step`` (restored; null: nothing committed yet), ``bytes``, ``seconds``,
    ``downloaded`` (false: a newer local checkpoint was kept).
``standby``
    ``holders`` (instance ids holding the slots): every slot was held; waiting.
``slot_taken``
    ``slot``, ``how`` (``free``, ``ours``, ``released``, ``expired``), ``handoff_seconds``.
``train_start``
    ``step`` (the step it resumes from), ``attempt``: the training command started.
``first_step``
    ``step``: the first new checkpoint the trainer wrote after a start (its ``t`` is
    when the supervisor saw it).
``commit``
    ``step``, ``reason``, ``bytes``, ``seconds`` (of the upload), ``created_at`` (the
    manifest's, when known: the work in the checkpoint is the work done until then).
``notice``
    ``kind`` (``interruption``, ``rebalance``, ``maintenance``, ``signal``), ``action``,
    ``deadline`` (the instance's, ISO UTC).
``stop``
    ``reason``, ``committed_step`` (the newest committed when training stopped),
    ``local_step`` (the newest complete local one; optional).
``exit``
    ``code``.

Writes are best effort and never in the caller's way: :meth:`RunLedger.record` only
appends in memory and wakes the ledger's own thread, which does every PUT (and the
metadata lookups of ``boot``). A PUT takes as long as the store's client allows (give
the ledger a store whose client has short timeouts and few attempts); whatever it does,
:meth:`RunLedger.flush` and :meth:`RunLedger.close` wait at most the seconds they are
given, and the thread is a daemon thread, so a hung PUT never holds up a drain or the
process's exit. A failed write is logged once (``ledger_write_failed``, a warning) per
run of failures, retried with backoff, and never raised: the ledger is an account of
the run, never a reason for it to fail.

:func:`read_ledger` reads every boot back, in order, skipping (with a warning) any line
that is not an event.

This module is the ledger's public face; every name is importable from here. Where each
part lives: :mod:`daemon.ledger_format` (keys, boot ids, times, the store's protocol),
:mod:`daemon.ledger_instance` (the machine's facts for the boot event),
:mod:`daemon.ledger_writer` (:class:`RunLedger` and its thread),
:mod:`daemon.ledger_reader` (:func:`read_ledger`, :class:`Boot`, :class:`LedgerEvent`).
"""

from daemon.ledger_format import (
    INTERRUPTING_KINDS,
    LEDGER_DIR,
    MAX_READ_BYTES,
    MAX_SEGMENT_BYTES,
    SUFFIX,
    LedgerStore,
    format_time,
    ledger_prefix,
    new_boot_id,
    parse_time,
    segment_key,
    utc_now,
)
from daemon.ledger_instance import (
    META_AVAILABILITY_ZONE,
    META_IDENTITY_DOCUMENT,
    META_INSTANCE_ID,
    META_INSTANCE_TYPE,
    META_LIFECYCLE,
    InstanceFacts,
    MetadataReader,
    host_uptime_s,
    instance_facts,
)
from daemon.ledger_reader import Boot, LedgerEvent, parse_lines, read_ledger
from daemon.ledger_writer import RunLedger

__all__ = [
    "INTERRUPTING_KINDS",
    "LEDGER_DIR",
    "MAX_READ_BYTES",
    "MAX_SEGMENT_BYTES",
    "META_AVAILABILITY_ZONE",
    "META_IDENTITY_DOCUMENT",
    "META_INSTANCE_ID",
    "META_INSTANCE_TYPE",
    "META_LIFECYCLE",
    "SUFFIX",
    "Boot",
    "InstanceFacts",
    "LedgerEvent",
    "LedgerStore",
    "MetadataReader",
    "RunLedger",
    "format_time",
    "host_uptime_s",
    "instance_facts",
    "ledger_prefix",
    "new_boot_id",
    "parse_lines",
    "parse_time",
    "read_ledger",
    "segment_key",
    "utc_now",
]
