"""The fault proxy itself: its lifecycle, its rules, and what it has seen.

:class:`FaultProxy` listens on 127.0.0.1, accepts connections (each served on a thread
of its own by :class:`.connection.ClientConnection`), keeps the rules in the order
added and the counters and records of the traffic. How a request is served is not
here: see :mod:`.connection`, :mod:`.upstream` and :mod:`.body`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import socket
import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from daemon.standins.faultproxy.body import Stopped
from daemon.standins.faultproxy.connection import ClientConnection
from daemon.standins.faultproxy.rules import Chosen, FaultKind, Phase, Rule, RuleMatch, choose
from daemon.standins.faultproxy.shaping import Shaping, connection_links
from daemon.standins.faultproxy.stats import ProxyStats, RequestRecord
from daemon.standins.faultproxy.wire import is_loopback_host

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11; only read by the type checker

_JOIN_TIMEOUT = 5.0
_RECORDS_KEPT = 10_000


class FaultProxy:
    """The proxy: ``with FaultProxy(upstream) as proxy:`` then point a client at ``proxy.url``.

    ``upstream`` is the server's base URL (``http://127.0.0.1:<port>``, loopback only).
    ``seed`` seeds the RNG of probabilistic rules. ``verify_checksums``: refuse a body
    that does not match its additional checksum header with ``400 BadDigest``, as S3 on
    AWS does (:mod:`.checksums`); moto and s3rver do not. :meth:`stop` (or leaving the ``with``)
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
        verify_checksums: bool = False,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream {upstream!r} must be http://<loopback host>:<port>")
        if not is_loopback_host(parts.hostname):
            raise ValueError(f"upstream {upstream!r} is not a loopback address")
        self.upstream = (parts.hostname, parts.port)
        self.answer_continue = answer_continue
        self.shaping = shaping
        self.verify_checksums = verify_checksums
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
    # Each helper takes the matching keywords of RuleMatch: method, path, count and
    # probability (see Rule).

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
        **match: Unpack[RuleMatch],
    ) -> Rule:
        """Answer matching requests with an S3 XML error, without forwarding them."""
        return self.add(Rule(FaultKind.ERROR, status=status, code=code, message=message, **match))

    def reset(
        self, phase: Phase | str = Phase.RESPONSE, after_bytes: int = 0, **match: Unpack[RuleMatch]
    ) -> Rule:
        """Reset the client connection after ``after_bytes`` bytes of the ``phase`` body."""
        return self.add(Rule(FaultKind.RESET, phase=Phase(phase), after_bytes=after_bytes, **match))

    def throttle(
        self, rate: float, phase: Phase | str = Phase.RESPONSE, **match: Unpack[RuleMatch]
    ) -> Rule:
        """Cap ``phase`` bodies (request, response or both) at ``rate`` bytes/s in all."""
        return self.add(Rule(FaultKind.THROTTLE, phase=Phase(phase), rate=rate, **match))

    def stall(self, seconds: float, **match: Unpack[RuleMatch]) -> Rule:
        """Forward the request, then wait ``seconds`` before relaying the answer."""
        return self.add(Rule(FaultKind.STALL, seconds=seconds, **match))

    def corrupt(
        self,
        phase: Phase | str = Phase.RESPONSE,
        after_bytes: int = 0,
        nbytes: int = 1,
        **match: Unpack[RuleMatch],
    ) -> Rule:
        """Flip ``nbytes`` bytes at body offset ``after_bytes`` of the ``phase`` body."""
        return self.add(
            Rule(
                FaultKind.CORRUPT,
                phase=Phase(phase),
                after_bytes=after_bytes,
                nbytes=nbytes,
                **match,
            )
        )

    def _choose(self, method: str, target: str) -> Chosen:
        with self._lock:
            return choose(self._rules, self._rng, method, target, self._stats.faults)

    # -- observation ------------------------------------------------------------------

    def stats(self, settle: float = 2.0) -> ProxyStats:
        """A snapshot of the counters, once requests in flight are done (up to ``settle``
        seconds: a client may read its answer before the proxy has counted it)."""
        self.wait_idle(settle)
        with self._lock:
            return dataclasses.replace(self._stats, faults=Counter(self._stats.faults))

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

    def _begin_request(self) -> int:
        """Count a request coming in; its number (for ``x-amz-request-id``)."""
        with self._lock:
            self._stats.requests += 1
            self._in_flight += 1
            return self._stats.requests

    def _end_request(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._in_flight -= 1
            self._idle.notify_all()

    def _count_forwarded(self) -> None:
        with self._lock:
            self._stats.forwarded += 1

    def _count_bytes(self, *, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self._stats.bytes_up += up
            self._stats.bytes_down += down

    def _count_corrupted(self, n: int) -> None:
        with self._lock:
            self._stats.bytes_corrupted += n

    def _count_rejected(self) -> None:
        with self._lock:
            self._stats.checksum_rejected += 1

    def _count_throttled(self, seconds: float) -> None:
        with self._lock:
            self._stats.throttled_seconds += seconds

    def _count_shaped(self, seconds: float) -> None:
        with self._lock:
            self._stats.shaped_seconds += seconds

    def _sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise Stopped

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
        try:
            ClientConnection(self, client, connection_links(self.shaping)).serve()
        finally:
            self._track(client, add=False)
            with contextlib.suppress(OSError):
                client.close()
            with self._lock:
                self._threads.discard(threading.current_thread())
