"""journald's native protocol without libsystemd: events as fields, not as lines.

When systemd connects our stdout to the journal it says so in ``$JOURNAL_STREAM``
(``<device>:<inode>`` of that stream). Then each event goes as one datagram to
``/run/systemd/journal/socket``, so ``journalctl -u spot-supervisor SPOT_EVENT=notice_received``
finds it and ``-o json`` shows every value as its own field.

The wire format (systemd's "Native Journal Protocol"): ``KEY=value\\n`` per field; a value
holding a newline goes binary-safe as ``KEY\\n`` + its length as 64-bit little endian +
the bytes + ``\\n``. A message too big for one datagram goes in a sealed memfd whose
descriptor is passed over the socket instead.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import struct
from collections.abc import Mapping
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "spot-supervisor"
FIELD_PREFIX = "SPOT_"

# syslog(3) priorities, as journald's PRIORITY= field wants them.
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}

# Keys of the event dict that become journald's own fields, not SPOT_ ones.
_RESERVED = {"event", "level"}
_FIELD_NAME_BAD = re.compile(r"[^A-Z0-9_]")
_MAX_FIELD_NAME = 64


def stream_is_journal(fd: int = 1, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``fd`` is the stream systemd connected to the journal (``$JOURNAL_STREAM``).

    Comparing device and inode, as sd_journal_stream_fd(3) advises, keeps a redirected
    stdout (``spot-supervisor run > file`` inside a unit) from being mistaken for it.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def field_name(key: str) -> str:
    """``SPOT_<KEY>`` in the characters journald accepts (A-Z, 0-9, _; at most 64)."""
    name = FIELD_PREFIX + _FIELD_NAME_BAD.sub("_", key.upper())
    return name[:_MAX_FIELD_NAME]


def field_value(value: Any) -> str:
    """Strings as they are; everything else as JSON (numbers, booleans, null, lists, dicts)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str, separators=(",", ":"))
    except (TypeError, ValueError):
        return repr(value)


def event_fields(event_dict: Mapping[str, Any]) -> dict[str, str]:
    """The journal fields for one structlog event dict."""
    event = str(event_dict.get("event", ""))
    level = str(event_dict.get("level", "info")).lower()
    rest = {k: v for k, v in event_dict.items() if k not in _RESERVED}
    summary = " ".join(f"{k}={field_value(v)}" for k, v in rest.items() if k != "timestamp")
    fields = {
        "MESSAGE": f"{event} {summary}".rstrip(),
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "SPOT_EVENT": event,
    }
    for key, value in rest.items():
        fields[field_name(key)] = field_value(value)
    return fields


def encode(fields: Mapping[str, str]) -> bytes:
    """One datagram of the native protocol; values with a newline in binary-safe form."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", errors="replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    """Sends field sets to journald; ``send`` returns False when journald did not take it."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def connect(cls, path: str = JOURNAL_SOCKET) -> JournalSender | None:
        """A sender when the socket is there, else None (the caller falls back to stdout)."""
        if not os.path.exists(path):
            return None
        return cls(path)

    def send(self, fields: Mapping[str, str]) -> bool:
        data = encode(fields)
        try:
            self._sock.sendto(data, self.path)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                return False  # journald gone (e.g. late in shutdown): the caller falls back
        return self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> bool:
        # Too big for a datagram: journald accepts a sealed memfd carrying the same bytes.
        try:
            fd = os.memfd_create("journal-message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError):
            return False
        try:
            os.write(fd, data)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = array.array("i", [fd])
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
