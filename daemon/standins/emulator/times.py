"""Times as the metadata services write them, and the clock the emulator reads them from.

AWS writes ``instance-action``'s ``time`` in ISO 8601 and scheduled events'
``NotBefore`` in its own ``21 Jan 2019 09:00:43 GMT``; Azure writes RFC 1123. Every
time given to the emulator must be aware (UTC or with an offset): a naive one is refused.
"""

from __future__ import annotations

import datetime as dt
import email.utils

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_iso(t: dt.datetime) -> str:
    """``2026-11-28T09:02:00Z``: the form of ``instance-action``'s ``time``."""
    return as_utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_event_time(t: dt.datetime) -> str:
    """``21 Jan 2019 09:00:43 GMT``: the form of scheduled events' ``NotBefore``.

    Month names are spelled out here rather than with ``%b``, which follows the locale.
    """
    u = as_utc(t)
    return f"{u.day} {_MONTHS[u.month - 1]} {u.year} {u:%H:%M:%S} GMT"


def rfc1123(t: dt.datetime) -> str:
    """``Mon, 19 Sep 2016 18:29:47 GMT``: the form of Azure's ``NotBefore``."""
    return email.utils.format_datetime(as_utc(t), usegmt=True)


def as_utc(t: dt.datetime) -> dt.datetime:
    if t.tzinfo is None:
        raise ValueError(f"{t!r} is a naive datetime; give an aware one (UTC)")
    return t.astimezone(dt.timezone.utc)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def parse_iso(value: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)
