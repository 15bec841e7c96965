"""HTTP/1.1 on a socket, as the fault proxy needs it: heads, lines, framing, hard resets.

A buffered reader (:class:`Reader`), a parsed head (:class:`Message`), rendering a head
back, and the socket-level helpers (an RST instead of a FIN, a peer that hung up). No
fault or rule is known here: what to do with the bytes is for :mod:`.body` and
:mod:`.connection`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import struct
from dataclasses import dataclass

MAX_HEAD = 64 * 1024  # request or response line plus headers
MAX_LINE = 4 * 1024  # one chunk-size or trailer line
BUF = 64 * 1024
# A client connection idle this long between requests is closed (botocore reconnects).
IDLE_TIMEOUT = 60.0
# One read or write on either side taking longer than this ends the connection.
IO_TIMEOUT = 60.0
CONNECT_TIMEOUT = 5.0
# Headers about one connection, never passed on: each side of the proxy has its own.
HOP_BY_HOP = frozenset({"connection", "expect", "proxy-connection", "keep-alive"})


class Reader:
    """A socket with a read buffer: heads, lines and bounded reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(BUF)
        if not data:
            return False
        self._buf += data
        return True

    def _take_through(self, sep: bytes) -> bytes | None:
        """The buffered bytes up to and including ``sep``, taken; None while it is not in."""
        end = self._buf.find(sep)
        if end < 0:
            return None
        taken = bytes(self._buf[: end + len(sep)])
        del self._buf[: end + len(sep)]
        return taken

    def read_head(self) -> bytes | None:
        """Bytes up to and including the blank line; None on a clean EOF before any."""
        while (head := self._take_through(b"\r\n\r\n")) is None:
            if len(self._buf) > MAX_HEAD:
                raise ValueError("header section too large")
            if not self._fill():
                if self._buf:
                    raise ConnectionError("connection closed inside a header section")
                return None
        return head

    def read_line(self) -> bytes:
        """One CRLF-terminated line, terminator included."""
        while (line := self._take_through(b"\r\n")) is None:
            if len(self._buf) > MAX_LINE:
                raise ValueError("line too long")
            if not self._fill():
                raise ConnectionError("connection closed inside a chunked body")
        return line

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one); b"" at EOF."""
        if not self._buf and not self._fill():
            return b""
        data = bytes(self._buf[:limit])
        del self._buf[:limit]
        return data


@dataclass
class Message:
    """A parsed request or response head."""

    first: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def without(self, names: frozenset[str]) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.headers if k.lower() not in names]

    def chunked(self) -> bool:
        te = self.get("transfer-encoding")
        return te is not None and "chunked" in te.lower()

    def content_length(self) -> int | None:
        value = self.get("content-length")
        if value is None:
            return None
        n = int(value.strip())
        if n < 0:
            raise ValueError(f"negative Content-Length {n}")
        return n

    def wants_close(self, version: str) -> bool:
        conn = (self.get("connection") or "").lower()
        return "close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn)


def parse_head(raw: bytes) -> Message:
    lines = raw.decode("latin-1").split("\r\n")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name, value.strip()))
    return Message(lines[0], headers)


def render_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    return (first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode(
        "latin-1"
    )


def no_body(method: str, status: int) -> bool:
    return method.upper() == "HEAD" or status in (204, 304) or 100 <= status < 200


def hard_reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN: the peer sees 'connection reset'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def dropped(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` (readable at once, and nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
