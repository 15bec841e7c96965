"""A fault-injecting HTTP/1.1 reverse proxy on loopback, between a client and a local S3.

Nothing here runs in production. The tests, ``make chaos`` and the demo put it between
the daemon's S3 client and moto, then tell it what to break:

* ``error``: answer with an S3-style XML error (503 SlowDown, 500 InternalError,
  403 AccessDenied, 404 NoSuchBucket, ...) without forwarding the request;
* ``reset``: cut the connection with a TCP RST (``SO_LINGER`` 0) part-way through the
  request body (phase ``request``) or the response body (phase ``response``);
* ``throttle``: cap the bytes per second of request and/or response bodies, one token
  bucket per rule shared by every connection it matches (a link, not a socket);
* ``stall``: forward the request, then wait before relaying the answer (longer than the
  client's read timeout, typically);
* ``corrupt``: flip bytes of the response body on its way to the client, or of the
  request body on its way to the server (which then stores bad bytes), same length.

Besides faults, the proxy can *shape* every connection the way S3 on AWS behaves
(:class:`Shaping`, ``--shape``): a first-byte latency (each answer starts no sooner than
30 ms after its request ended) and a bandwidth cap per connection (90 MB/s each way), so
that, as on AWS, a client's throughput grows with its number of connections instead of
with whatever loopback allows. The benchmarks run through it (``bench/servers.py``).

A rule matches a method and a regex searched in the request target (``/bucket/key?query``),
and fires for the next ``count`` matching requests (None: every one), each with
``probability`` drawn from the proxy's seeded RNG. Per request at most one rule of each
kind fires, the first in the order added; an ``error`` excludes every other kind.

The proxy answers ``Expect: 100-continue`` itself (botocore sends it for PUTs of more
than 1 MB) and never passes it upstream; with ``answer_continue=False`` it ignores the
header, and botocore sends the body anyway after waiting 1 s. An ``error`` for such a
request is sent before the body, with ``Connection: close``.

Drive it from Python (:meth:`FaultProxy.add`, :meth:`FaultProxy.error`, ...) or, from
another process, over HTTP on ``/__faultproxy__/`` (``GET stats``, ``POST rules`` with a
rule as JSON, ``DELETE rules``). Run standalone::

    python -m daemon.standins.faultproxy --upstream http://127.0.0.1:5000 [--port 0] [--seed 1]

Only loopback: the proxy listens on 127.0.0.1 and forwards only to a loopback upstream.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import random
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import FrameType
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

CONTROL_PREFIX = "/__faultproxy__/"
CONTROL_STATS_PATH = CONTROL_PREFIX + "stats"
CONTROL_RULES_PATH = CONTROL_PREFIX + "rules"

_MAX_HEAD = 64 * 1024  # request or response line plus headers
_MAX_LINE = 4 * 1024  # one chunk-size or trailer line
_BUF = 64 * 1024
# A client connection idle this long between requests is closed (botocore reconnects).
_IDLE_TIMEOUT = 60.0
# One read or write on either side taking longer than this ends the connection.
_IO_TIMEOUT = 60.0
_CONNECT_TIMEOUT = 5.0
_JOIN_TIMEOUT = 5.0
_RECORDS_KEPT = 10_000
_ATTEMPT_RE = re.compile(r"attempt=(\d+)")

# S3's own wording, so clients log what they would log against AWS.
_DEFAULT_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "AccessDenied": "Access Denied",
    "NoSuchBucket": "The specified bucket does not exist",
    "NoSuchKey": "The specified key does not exist.",
    "ServiceUnavailable": "Service is unable to handle request.",
}
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
# Headers about one connection, never passed on: each side of the proxy has its own.
_HOP_BY_HOP = frozenset({"connection", "expect", "proxy-connection", "keep-alive"})


class FaultKind(str, Enum):
    """What a rule does to the requests it fires on."""

    ERROR = "error"
    RESET = "reset"
    THROTTLE = "throttle"
    STALL = "stall"
    CORRUPT = "corrupt"


class Phase(str, Enum):
    """Which body a ``reset``, ``corrupt`` or ``throttle`` rule acts on."""

    REQUEST = "request"
    RESPONSE = "response"
    BOTH = "both"  # throttle only


@dataclass
class Rule:
    """One fault: what it matches, how often it fires, and what it does.

    ``method`` is compared case-insensitively (None: any); ``path`` is a regex searched in
    the request target, query included. ``count`` is the number of firings left (None:
    unlimited). Action parameters: ``status``/``code``/``message`` (error), ``phase``
    (reset, corrupt, throttle), ``after_bytes`` (reset and corrupt: the body offset;
    a reset always cuts the body short, even one no longer than that), ``nbytes``
    (corrupt: bytes flipped), ``rate`` (throttle: bytes per second), ``seconds`` (stall).
    ``applied`` counts firings.
    """

    kind: FaultKind
    method: str | None = None
    path: str | None = None
    count: int | None = None
    probability: float = 1.0
    status: int = 503
    code: str = "SlowDown"
    message: str | None = None
    phase: Phase = Phase.RESPONSE
    after_bytes: int = 0
    nbytes: int = 1
    rate: float = 0.0
    seconds: float = 0.0
    applied: int = 0
    id: int = 0
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _bucket: _TokenBucket | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.kind = FaultKind(self.kind)
        self.phase = Phase(self.phase)
        if self.count is not None and self.count < 0:
            raise ValueError(f"count {self.count} must be >= 0 or None")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} must be within [0, 1]")
        if self.after_bytes < 0 or self.nbytes < 1:
            raise ValueError("after_bytes must be >= 0 and nbytes >= 1")
        if self.kind is FaultKind.THROTTLE:
            if self.rate <= 0:
                raise ValueError(f"throttle rate {self.rate} must be > 0 bytes/s")
            self._bucket = _TokenBucket(self.rate)
        elif self.phase is Phase.BOTH:
            raise ValueError(f"phase 'both' is for throttle rules only, not {self.kind.value}")
        if self.kind is FaultKind.STALL and self.seconds <= 0:
            raise ValueError(f"stall seconds {self.seconds} must be > 0")
        if self.kind is FaultKind.ERROR and not 400 <= self.status <= 599:
            raise ValueError(f"error status {self.status} must be 4xx or 5xx")
        self._regex = re.compile(self.path) if self.path is not None else None

    def matches(self, method: str, target: str) -> bool:
        """Whether the request ``method target`` is one this rule is about."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self._regex is None or self._regex.search(target) is not None

    @property
    def exhausted(self) -> bool:
        """True once the rule has fired ``count`` times."""
        return self.count is not None and self.applied >= self.count

    def acts_on(self, phase: Phase) -> bool:
        """Whether the rule acts on the body of ``phase`` (request or response)."""
        return self.phase is phase or self.phase is Phase.BOTH

    def to_dict(self) -> dict[str, Any]:
        """The rule as JSON-ready values (for the HTTP control API)."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "method": self.method,
            "path": self.path,
            "count": self.count,
            "probability": self.probability,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "phase": self.phase.value,
            "after_bytes": self.after_bytes,
            "nbytes": self.nbytes,
            "rate": self.rate,
            "seconds": self.seconds,
            "applied": self.applied,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Rule:
        """A rule from :meth:`to_dict`'s keys (``kind`` required); ValueError on others."""
        allowed = {
            "kind",
            "method",
            "path",
            "count",
            "probability",
            "status",
            "code",
            "message",
            "phase",
            "after_bytes",
            "nbytes",
            "rate",
            "seconds",
        }
        unknown = set(doc) - allowed - {"id", "applied"}
        if unknown:
            raise ValueError(f"unknown rule keys: {', '.join(sorted(unknown))}")
        if "kind" not in doc:
            raise ValueError("a rule needs a 'kind'")
        try:
            return cls(**{k: v for k, v in doc.items() if k in allowed})
        except TypeError as exc:
            raise ValueError(str(exc)) from exc


@dataclass(frozen=True)
class RequestRecord:
    """One request the proxy saw: what it was, what was done to it, how it ended.

    ``status`` is the status relayed or injected (None when the connection was reset or
    broke before one); ``attempt`` is botocore's attempt number (``amz-sdk-request``).
    """

    method: str
    target: str
    headers: Mapping[str, str]
    faults: tuple[str, ...]
    status: int | None
    attempt: int | None
    started: float
    seconds: float


# S3 Standard's first-byte latency for small objects is tens of milliseconds: AWS's
# performance guidelines speak of "100-200 milliseconds" only for the tail, and present
# S3 Express One Zone's "single-digit millisecond" access as "up to 10x faster" than S3
# Standard. 30 ms is the middle of that range, as seen from an EC2 instance in-region.
DEFAULT_FIRST_BYTE_LATENCY = 0.030
# "Make one concurrent request for each 85-90 MB/s of desired network throughput" (AWS,
# "Performance design patterns for Amazon S3"): one S3 connection carries about 90 MB/s.
DEFAULT_CONNECTION_RATE = 90e6


@dataclass(frozen=True)
class Shaping:
    """S3 as AWS serves it, roughly: every connection is a link of its own.

    ``first_byte_latency``: seconds from the end of a request to the first byte of its
    answer (the upstream's own time counts towards it). ``connection_rate``: bytes per
    second each connection carries, each way (request bodies up, response bodies down).
    Either may be 0 to leave it out. Sources in :data:`DEFAULT_FIRST_BYTE_LATENCY` and
    :data:`DEFAULT_CONNECTION_RATE`.
    """

    first_byte_latency: float = DEFAULT_FIRST_BYTE_LATENCY
    connection_rate: float = DEFAULT_CONNECTION_RATE

    def __post_init__(self) -> None:
        if self.first_byte_latency < 0 or self.connection_rate < 0:
            raise ValueError("shaping latency and rate must not be negative")

    def to_dict(self) -> dict[str, float]:
        return {
            "first_byte_latency_ms": round(self.first_byte_latency * 1000, 3),
            "connection_mb_per_s": round(self.connection_rate / 1e6, 3),
        }


@dataclass
class ProxyStats:
    """Counters since start: requests, forwarded ones, faults by kind, body bytes."""

    connections: int = 0
    requests: int = 0
    forwarded: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0  # request body bytes relayed to the upstream
    bytes_down: int = 0  # response body bytes relayed to clients
    bytes_corrupted: int = 0
    throttled_seconds: float = 0.0
    shaped_seconds: float = 0.0  # waits the shaping imposed (latency and bandwidth)

    def to_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "requests": self.requests,
            "forwarded": self.forwarded,
            "faults": dict(self.faults),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_corrupted": self.bytes_corrupted,
            "throttled_seconds": round(self.throttled_seconds, 3),
            "shaped_seconds": round(self.shaped_seconds, 3),
        }


class _Stopped(Exception):
    """The proxy is stopping: drop the connection."""


class _Reset(Exception):
    """A reset rule says: cut the client connection now, with an RST."""


class _TokenBucket:
    """``rate`` bytes per second with a burst of ``burst_s`` seconds, shared by threads."""

    def __init__(self, rate: float, burst_s: float = 0.1) -> None:
        self.rate = float(rate)
        self.burst = max(1024.0, self.rate * burst_s)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def piece(self) -> int:
        """The largest write that keeps the pacing smooth."""
        return max(1, int(self.burst))

    def reserve(self, n: int) -> float:
        """Take ``n`` tokens (going into debt); the seconds to wait before sending."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class _Reader:
    """A socket with a read buffer: heads, lines and bounded reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(_BUF)
        if not data:
            return False
        self._buf += data
        return True

    def read_head(self) -> bytes | None:
        """Bytes up to and including the blank line; None on a clean EOF before any."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self._buf[: end + 4])
                del self._buf[: end + 4]
                return head
            if len(self._buf) > _MAX_HEAD:
                raise ValueError("header section too large")
            if not self._fill():
                if self._buf:
                    raise ConnectionError("connection closed inside a header section")
                return None

    def read_line(self) -> bytes:
        """One CRLF-terminated line, terminator included."""
        while True:
            end = self._buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buf[: end + 2])
                del self._buf[: end + 2]
                return line
            if len(self._buf) > _MAX_LINE:
                raise ValueError("line too long")
            if not self._fill():
                raise ConnectionError("connection closed inside a chunked body")

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one); b"" at EOF."""
        if not self._buf and not self._fill():
            return b""
        data = bytes(self._buf[:limit])
        del self._buf[:limit]
        return data


@dataclass
class _Message:
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


def _parse_head(raw: bytes) -> _Message:
    lines = raw.decode("latin-1").split("\r\n")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name, value.strip()))
    return _Message(lines[0], headers)


def _render_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    return (first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode(
        "latin-1"
    )


def _hard_reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN: the peer sees 'connection reset'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _BodyPlan:
    """The faults acting on one body: where to flip bytes, where to cut, how fast to go."""

    def __init__(
        self,
        proxy: FaultProxy,
        corrupt: Rule | None,
        reset: Rule | None,
        throttles: list[Rule],
        total: int | None,
        link: _TokenBucket | None = None,
    ) -> None:
        self._proxy = proxy
        self.offset = 0
        self._link = link  # the connection's own bandwidth (shaping)
        self._corrupt = (
            (corrupt.after_bytes, corrupt.after_bytes + corrupt.nbytes) if corrupt else None
        )
        self._cut: int | None = None
        if reset is not None:
            # Always short of the end, so the peer never gets a whole body.
            self._cut = reset.after_bytes if total is None else min(reset.after_bytes, total - 1)
            self._cut = max(self._cut, 0)
        self._buckets = [r._bucket for r in throttles if r._bucket is not None]

    def check_cut(self) -> None:
        """Reset now when the cut is due (called before the body and at its end)."""
        if self._cut is not None and self.offset >= self._cut:
            raise _Reset

    def end_of_body(self) -> None:
        """The body ends here: a planned reset that is not done yet happens now."""
        if self._cut is not None:
            raise _Reset

    def send(self, dst: socket.socket, data: bytes) -> None:
        """Send body bytes ``data`` to ``dst``, with the plan's faults applied."""
        if not (self._buckets or self._link or self._cut is not None or self._corrupt):
            dst.sendall(data)  # the common case under shaping alone: no copies
            self.offset += len(data)
            return
        view = memoryview(data)
        while view:
            n = len(view)
            if self._cut is not None:
                if self.offset >= self._cut:
                    raise _Reset
                n = min(n, self._cut - self.offset)
            for bucket in self._buckets:
                n = min(n, bucket.piece())
            if self._link is not None:
                n = min(n, self._link.piece())
            piece: bytes | bytearray | memoryview = view[:n]
            view = view[n:]
            if self._corrupt is not None:
                piece = bytearray(piece)
                lo = max(self._corrupt[0], self.offset)
                hi = min(self._corrupt[1], self.offset + n)
                for i in range(lo, hi):
                    piece[i - self.offset] ^= 0xFF
                if hi > lo:
                    self._proxy._count_corrupted(hi - lo)
            for bucket in self._buckets:
                wait = bucket.reserve(n)
                if wait > 0:
                    self._proxy._sleep(wait)
                    self._proxy._count_throttled(wait)
            if self._link is not None:
                wait = self._link.reserve(n)
                if wait > 0:
                    self._proxy._sleep(wait)
                    self._proxy._count_shaped(wait)
            dst.sendall(piece)
            self.offset += n


@dataclass
class _Chosen:
    """The rules firing on one request, at most one per kind."""

    error: Rule | None = None
    reset: Rule | None = None
    stall: Rule | None = None
    corrupt: Rule | None = None
    throttles: list[Rule] = field(default_factory=list)
    # The connection's shaped links, one per direction (None: not shaped).
    link_up: _TokenBucket | None = None
    link_down: _TokenBucket | None = None

    def names(self) -> tuple[str, ...]:
        kinds = [r.kind.value for r in (self.error, self.reset, self.stall, self.corrupt) if r]
        return tuple(kinds + [r.kind.value for r in self.throttles[:1]])

    def body_rules(self, phase: Phase) -> tuple[Rule | None, Rule | None, list[Rule]]:
        corrupt = self.corrupt if self.corrupt and self.corrupt.acts_on(phase) else None
        reset = self.reset if self.reset and self.reset.acts_on(phase) else None
        return corrupt, reset, [r for r in self.throttles if r.acts_on(phase)]


class FaultProxy:
    """The proxy: ``with FaultProxy(upstream) as proxy:`` then point a client at ``proxy.url``.

    ``upstream`` is the server's base URL (``http://127.0.0.1:<port>``, loopback only).
    ``seed`` seeds the RNG of probabilistic rules. :meth:`stop` (or leaving the ``with``)
    closes every connection and joins every thread.
    """

    def __init__(
        self,
        upstream: str,
        *,
        port: int = 0,
        seed: int = 0,
        answer_continue: bool = True,
        shaping: Shaping | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream {upstream!r} must be http://<loopback host>:<port>")
        if not _is_loopback_host(parts.hostname):
            raise ValueError(f"upstream {upstream!r} is not a loopback address")
        self.upstream = (parts.hostname, parts.port)
        self.answer_continue = answer_continue
        self.shaping = shaping
        self._port = port
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._next_id = 1
        self._stats = ProxyStats()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        self._records: deque[RequestRecord] = deque(maxlen=_RECORDS_KEPT)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 and serve in background threads."""
        if self._listener is not None:
            raise RuntimeError("proxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self._port))
        listener.listen(128)
        # Polled, so the accept loop sees stop() within a tenth of a second.
        listener.settimeout(0.1)
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="faultproxy-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close every connection, stop listening, join every thread (bounded)."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(_JOIN_TIMEOUT)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            socks = list(self._sockets)
            threads = list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("proxy not started")
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the endpoint URL to give the client."""
        return f"http://127.0.0.1:{self.port}"

    # -- rules ------------------------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        """Add ``rule`` after the existing ones; the same rule, with its ``id`` set."""
        with self._lock:
            rule.id = self._next_id
            self._next_id += 1
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        """Stop applying ``rule`` (no error when it is already gone)."""
        with self._lock:
            self._rules = [r for r in self._rules if r is not rule]

    def clear(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def error(
        self,
        status: int = 503,
        code: str = "SlowDown",
        message: str | None = None,
        *,
        method: str | None = None,
        path: str | None = None,
        count: int | None = None,
        probability: float = 1.0,
    ) -> Rule:
        """Answer matching requests with an S3 XML error, without forwarding them."""
        return self.add(
            Rule(FaultKind.ERROR, method, path, count, probability, status, code, message)
        )

    def reset(
        self,
        phase: Phase | str = Phase.RESPONSE,
        after_bytes: int = 0,
        *,
        method: str | None = None,
        path: str | None = None,
        count: int | None = None,
        probability: float = 1.0,
    ) -> Rule:
        """Reset the client connection after ``after_bytes`` bytes of the ``phase`` body."""
        return self.add(
            Rule(
                FaultKind.RESET,
                method,
                path,
                count,
                probability,
                phase=Phase(phase),
                after_bytes=after_bytes,
            )
        )

    def throttle(
        self,
        rate: float,
        phase: Phase | str = Phase.RESPONSE,
        *,
        method: str | None = None,
        path: str | None = None,
        count: int | None = None,
        probability: float = 1.0,
    ) -> Rule:
        """Cap ``phase`` bodies (request, response or both) at ``rate`` bytes/s in all."""
        return self.add(
            Rule(
                FaultKind.THROTTLE,
                method,
                path,
                count,
                probability,
                phase=Phase(phase),
                rate=rate,
            )
        )

    def stall(
        self,
        seconds: float,
        *,
        method: str | None = None,
        path: str | None = None,
        count: int | None = None,
        probability: float = 1.0,
    ) -> Rule:
        """Forward the request, then wait ``seconds`` before relaying the answer."""
        return self.add(Rule(FaultKind.STALL, method, path, count, probability, seconds=seconds))

    def corrupt(
        self,
        phase: Phase | str = Phase.RESPONSE,
        after_bytes: int = 0,
        nbytes: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        count: int | None = None,
        probability: float = 1.0,
    ) -> Rule:
        """Flip ``nbytes`` bytes at body offset ``after_bytes`` of the ``phase`` body."""
        return self.add(
            Rule(
                FaultKind.CORRUPT,
                method,
                path,
                count,
                probability,
                phase=Phase(phase),
                after_bytes=after_bytes,
                nbytes=nbytes,
            )
        )

    # -- observation ------------------------------------------------------------------

    def stats(self, settle: float = 2.0) -> ProxyStats:
        """A snapshot of the counters, once requests in flight are done (up to ``settle``
        seconds: a client may read its answer before the proxy has counted it)."""
        self.wait_idle(settle)
        with self._lock:
            s = self._stats
            return ProxyStats(
                s.connections,
                s.requests,
                s.forwarded,
                Counter(s.faults),
                s.bytes_up,
                s.bytes_down,
                s.bytes_corrupted,
                s.throttled_seconds,
                s.shaped_seconds,
            )

    def records(
        self, method: str | None = None, path: str | None = None, *, settle: float = 2.0
    ) -> list[RequestRecord]:
        """The requests seen (the last 10 000), optionally only those ``method``/``path``
        (a regex searched in the target) match. A request is recorded when the proxy is
        done with it, so this first waits up to ``settle`` seconds for those in flight."""
        self.wait_idle(settle)
        regex = re.compile(path) if path is not None else None
        with self._lock:
            found = list(self._records)
        return [
            r
            for r in found
            if (method is None or r.method.upper() == method.upper())
            and (regex is None or regex.search(r.target))
        ]

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no request is being served (a stalled one ends when its stall does);
        False if one still is after ``timeout`` seconds. Records are complete after it."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _count_corrupted(self, n: int) -> None:
        with self._lock:
            self._stats.bytes_corrupted += n

    def _count_throttled(self, seconds: float) -> None:
        with self._lock:
            self._stats.throttled_seconds += seconds

    def _count_shaped(self, seconds: float) -> None:
        with self._lock:
            self._stats.shaped_seconds += seconds

    def _links(self) -> tuple[_TokenBucket | None, _TokenBucket | None]:
        """A new connection's own links (up, down) under the shaping, if any."""
        shaping = self.shaping
        if shaping is None or shaping.connection_rate <= 0:
            return None, None
        # A burst of 10 ms: short enough that even a small object feels the rate.
        return (
            _TokenBucket(shaping.connection_rate, burst_s=0.01),
            _TokenBucket(shaping.connection_rate, burst_s=0.01),
        )

    def _sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise _Stopped

    # -- serving ----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(
                target=self._serve_connection, args=(sock,), name="faultproxy-conn", daemon=True
            )
            with self._lock:
                self._stats.connections += 1
                self._sockets.add(sock)
                self._threads.add(t)
            t.start()

    def _track(self, sock: socket.socket | None, add: bool) -> None:
        if sock is None:
            return
        with self._lock:
            if add:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)

    def _serve_connection(self, client: socket.socket) -> None:
        up: _Upstream | None = None
        try:
            up = _Upstream(self)
            reader = _Reader(client)
            links = self._links()
            while not self._stopping.is_set():
                client.settimeout(_IDLE_TIMEOUT)
                head = reader.read_head()
                if head is None:
                    return
                client.settimeout(_IO_TIMEOUT)
                if not self._serve_request(client, reader, up, _parse_head(head), links):
                    return
        except _Reset:
            _hard_reset(client)
        except (OSError, ValueError, _Stopped):
            pass  # the client went away, sent garbage, or we are stopping: drop it
        finally:
            if up is not None:
                up.close()
            self._track(client, add=False)
            with contextlib.suppress(OSError):
                client.close()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _choose(self, method: str, target: str) -> _Chosen:
        chosen = _Chosen()
        with self._lock:
            candidates = [r for r in self._rules if not r.exhausted and r.matches(method, target)]
            # Errors first: an error answers the request, so no other rule should spend a firing.
            candidates.sort(key=lambda r: r.kind is not FaultKind.ERROR)
            for rule in candidates:
                if chosen.error is not None:
                    break  # errors sort first: the request is answered, nothing else applies
                single = rule.kind not in (FaultKind.ERROR, FaultKind.THROTTLE)
                if single and getattr(chosen, rule.kind.value) is not None:
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                rule.applied += 1
                self._stats.faults[rule.kind.value] += 1
                if rule.kind is FaultKind.THROTTLE:
                    chosen.throttles.append(rule)
                else:
                    setattr(chosen, rule.kind.value, rule)
        return chosen

    def _serve_request(
        self,
        client: socket.socket,
        reader: _Reader,
        up: _Upstream,
        req: _Message,
        links: tuple[_TokenBucket | None, _TokenBucket | None] = (None, None),
    ) -> bool:
        """Serve one request; whether the client connection may serve another."""
        try:
            method, target, version = req.first.split(" ", 2)
        except ValueError as exc:
            raise ValueError(f"malformed request line {req.first!r}") from exc
        started = time.monotonic()
        if target.startswith(CONTROL_PREFIX):  # not counted: the stats are about the traffic
            return self._serve_control(client, reader, req, method, target, version)
        with self._lock:
            self._stats.requests += 1
            self._in_flight += 1
        chosen = self._choose(method, target)
        chosen.link_up, chosen.link_down = links
        attempt_m = _ATTEMPT_RE.search(req.get("amz-sdk-request") or "")
        status: int | None = None

        def record() -> None:
            rec = RequestRecord(
                method,
                target,
                {k.lower(): v for k, v in req.headers},
                chosen.names(),
                status,
                int(attempt_m.group(1)) if attempt_m else None,
                started,
                time.monotonic() - started,
            )
            with self._lock:
                self._records.append(rec)
                self._in_flight -= 1
                self._idle.notify_all()

        try:
            expects = "100-continue" in (req.get("expect") or "").lower()
            keep = not req.wants_close(version)
            if chosen.error is not None:
                status = chosen.error.status
                if expects:
                    # The body has not been sent and never will be: close after answering.
                    self._send_error(client, chosen.error, method, target, close=True)
                    return False
                self._drain_body(reader, req)
                self._send_error(client, chosen.error, method, target, close=not keep)
                return keep

            cut_request = chosen.reset is not None and chosen.reset.phase is Phase.REQUEST
            if cut_request and not req.chunked() and not req.content_length():
                raise _Reset  # no body to cut short: drop the request before any answer
            if expects and self.answer_continue:
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            with self._lock:
                self._stats.forwarded += 1
            up.send_request(req, method, target, version, reader, chosen)
            sent = time.monotonic()
            resp, resp_version = up.read_response_head()
            latency = self.shaping.first_byte_latency if self.shaping is not None else 0.0
            if latency > 0:
                # The upstream's own time counts: the answer starts `latency` after the request.
                wait = latency - (time.monotonic() - sent)
                if wait > 0:
                    self._sleep(wait)
                    self._count_shaped(wait)
            status = int(resp.first.split(" ", 2)[1])
            if chosen.stall is not None:
                self._sleep(chosen.stall.seconds)
            # moto (werkzeug) closes after every answer; the client side stays alive
            # anyway, as it would against S3, whenever the body has a known end.
            delimited = (
                _no_body(method, status) or resp.chunked() or resp.content_length() is not None
            )
            keep = keep and delimited
            headers = [
                *resp.without(_HOP_BY_HOP),
                ("Connection", "keep-alive" if keep else "close"),
            ]
            _version, _, rest = resp.first.partition(" ")
            client.sendall(_render_head("HTTP/1.1 " + rest, headers))
            up.relay_response_body(resp, method, status, client, chosen)
            if not delimited or resp.wants_close(resp_version):
                up.close()
            return keep
        except _Reset:
            status = None
            raise
        finally:
            record()

    def _drain_body(self, reader: _Reader, req: _Message) -> None:
        if req.chunked():
            _relay_chunked(reader, None, None)
            return
        left = req.content_length() or 0
        while left > 0:
            data = reader.read_some(min(left, _BUF))
            if not data:
                raise ConnectionError("client closed inside a request body")
            left -= len(data)

    def _send_error(
        self, client: socket.socket, rule: Rule, method: str, target: str, *, close: bool
    ) -> None:
        with self._lock:
            request_id = f"faultproxy-{self._stats.requests:08d}"
        message = rule.message or _DEFAULT_MESSAGES.get(rule.code, rule.code)
        resource = target.split("?", 1)[0]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(rule.code)}</Code><Message>{escape(message)}</Message>"
            f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        if method.upper() == "HEAD":
            body = b""
        headers = [
            ("Content-Type", "application/xml"),
            ("Content-Length", str(len(body))),
            ("x-amz-request-id", request_id),
            ("Connection", "close" if close else "keep-alive"),
        ]
        first = f"HTTP/1.1 {rule.status} {_REASONS.get(rule.status, 'Error')}"
        client.sendall(_render_head(first, headers) + body)

    def _serve_control(
        self,
        client: socket.socket,
        reader: _Reader,
        req: _Message,
        method: str,
        target: str,
        version: str,
    ) -> bool:
        length = req.content_length() or 0
        if length > _MAX_HEAD:
            raise ValueError("control request too large")
        body = b""
        while len(body) < length:
            data = reader.read_some(length - len(body))
            if not data:
                raise ConnectionError("client closed inside a control request")
            body += data
        path = target.split("?", 1)[0]
        status: int = 200
        doc: Any = {}
        if path == CONTROL_STATS_PATH and method == "GET":
            doc = self.stats().to_dict()
        elif path == CONTROL_RULES_PATH and method == "GET":
            doc = {"rules": [r.to_dict() for r in self.rules]}
        elif path == CONTROL_RULES_PATH and method == "POST":
            try:
                spec = json.loads(body or b"{}")
                if not isinstance(spec, dict):
                    raise ValueError("a rule is a JSON object")
                doc = self.add(Rule.from_dict(spec)).to_dict()
            except (ValueError, re.error) as exc:
                status, doc = 400, {"error": str(exc)}
        elif path == CONTROL_RULES_PATH and method == "DELETE":
            self.clear()
            doc = {"rules": []}
        else:
            status, doc = 404, {"error": f"no control endpoint {method} {path}"}
        payload = json.dumps(doc).encode() + b"\n"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
        ]
        client.sendall(_render_head(f"HTTP/1.1 {status} {reason}", headers) + payload)
        return not req.wants_close(version)


def _dropped(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` (readable at once, and nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _no_body(method: str, status: int) -> bool:
    return method.upper() == "HEAD" or status in (204, 304) or 100 <= status < 200


def _relay_chunked(src: _Reader, dst: socket.socket | None, plan: _BodyPlan | None) -> None:
    """Relay (or, with no ``dst``, discard) one chunked body, framing verbatim."""
    while True:
        line = src.read_line()
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            if plan is not None:
                plan.end_of_body()  # a reset never lets the last chunk through
            if dst is not None:
                dst.sendall(line)
            while True:  # trailers, then the blank line
                trailer = src.read_line()
                if dst is not None:
                    dst.sendall(trailer)
                if trailer == b"\r\n":
                    return
        if dst is not None:
            dst.sendall(line)
        left = size
        while left > 0:
            data = src.read_some(min(left, _BUF))
            if not data:
                raise ConnectionError("connection closed inside a chunk")
            left -= len(data)
            if dst is not None:
                if plan is not None:
                    plan.send(dst, data)
                else:
                    dst.sendall(data)
        crlf = src.read_line()
        if dst is not None:
            dst.sendall(crlf)


def _relay_length(src: _Reader, dst: socket.socket, plan: _BodyPlan, length: int | None) -> bool:
    """Relay ``length`` bytes (None: until EOF); whether the source reached EOF."""
    plan.check_cut()
    left = length
    while left is None or left > 0:
        data = src.read_some(_BUF if left is None else min(left, _BUF))
        if not data:
            if left is None:
                plan.end_of_body()  # an RST, not a FIN, ends the body
                return True
            raise ConnectionError("connection closed inside a body")
        if left is not None:
            left -= len(data)
        plan.send(dst, data)
    plan.check_cut()
    return False


class _Upstream:
    """The connection to the upstream server of one client connection, opened lazily."""

    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy
        self.sock: socket.socket | None = None
        self.reader: _Reader | None = None
        self._reused = False

    def _connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection(self._proxy.upstream, timeout=_CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(_IO_TIMEOUT)
            self._proxy._track(sock, add=True)
            self.sock, self.reader = sock, _Reader(sock)
            self._reused = False
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self._proxy._track(self.sock, add=False)
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = self.reader = None

    def send_request(
        self,
        req: _Message,
        method: str,
        target: str,
        version: str,
        client_reader: _Reader,
        chosen: _Chosen,
    ) -> None:
        head = _render_head(f"{method} {target} HTTP/1.1", req.without(_HOP_BY_HOP))
        if self.sock is not None and _dropped(self.sock):
            # The server closed the idle connection (Node's keep-alive ends after 5 s): a
            # write would still succeed and the answer never come. Reconnect first.
            self.close()
        sock = self._connect()
        try:
            sock.sendall(head)
        except OSError:
            if not self._reused:
                raise
            # The server closed the idle connection meanwhile: one fresh try.
            self.close()
            sock = self._connect()
            sock.sendall(head)
        corrupt, reset, throttles = chosen.body_rules(Phase.REQUEST)
        total = None if req.chunked() else (req.content_length() or 0)
        plan = _BodyPlan(self._proxy, corrupt, reset, throttles, total, chosen.link_up)
        try:
            if req.chunked():
                _relay_chunked(client_reader, sock, plan)
            else:
                _relay_length(client_reader, sock, plan, total)
        except _Reset:
            self.close()  # the server gets half a request, then EOF
            raise
        finally:
            with self._proxy._lock:
                self._proxy._stats.bytes_up += plan.offset

    def read_response_head(self) -> tuple[_Message, str]:
        assert self.reader is not None
        while True:
            head = self.reader.read_head()
            if head is None:
                raise ConnectionError("upstream closed before answering")
            resp = _parse_head(head)
            version, _, rest = resp.first.partition(" ")
            code = int(rest.split(" ", 1)[0])
            if code >= 200 or code == 101:
                self._reused = True
                return resp, version
            # 1xx: we never sent Expect upstream, but skip any informational answer.

    def relay_response_body(
        self, resp: _Message, method: str, status: int, client: socket.socket, chosen: _Chosen
    ) -> bool:
        """Relay the body; True when it was delimited by the server closing."""
        assert self.reader is not None
        corrupt, reset, throttles = chosen.body_rules(Phase.RESPONSE)
        no_body = _no_body(method, status)
        length = 0 if no_body else (None if resp.chunked() else resp.content_length())
        plan = _BodyPlan(self._proxy, corrupt, reset, throttles, length, chosen.link_down)
        try:
            if not no_body and resp.chunked():
                _relay_chunked(self.reader, client, plan)
                return False
            return _relay_length(self.reader, client, plan, length)
        except _Reset:
            self.close()
            raise
        finally:
            with self._proxy._lock:
                self._proxy._stats.bytes_down += plan.offset


def main(argv: list[str] | None = None) -> int:
    """``python -m daemon.standins.faultproxy --upstream URL``: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m daemon.standins.faultproxy", description=__doc__
    )
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:<port> of the server")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any)")
    parser.add_argument("--seed", type=int, default=0, help="seed of probabilistic rules")
    parser.add_argument(
        "--shape", action="store_true", help="shape every connection as S3 on AWS (see Shaping)"
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=DEFAULT_FIRST_BYTE_LATENCY * 1000,
        help="with --shape: first-byte latency (default %(default)g ms)",
    )
    parser.add_argument(
        "--connection-mbps",
        type=float,
        default=DEFAULT_CONNECTION_RATE / 1e6,
        help="with --shape: MB/s per connection, each way (default %(default)g)",
    )
    args = parser.parse_args(argv)
    try:
        shaping = (
            Shaping(args.latency_ms / 1000, args.connection_mbps * 1e6) if args.shape else None
        )
        proxy = FaultProxy(args.upstream, port=args.port, seed=args.seed, shaping=shaping)
    except ValueError as exc:
        print(f"faultproxy: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with proxy:
        print(proxy.url, flush=True)
        while not done.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
