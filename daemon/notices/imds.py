"""The EC2 instance metadata service, IMDSv2 only: its paths, its headers, and a small client.

The client keeps one HTTP/1.1 connection open across polls and one session token
across requests, so a poll with a fresh token is exactly one request. It never falls
back to IMDSv1: an instance that requires tokens answers 401 to a tokenless GET, and
a client that guesses wrong there would look like "no notice" for the whole run.

Every failure to get an answer (refused, timed out, closed, 5xx, 429, a body that is
not what the path promises) raises :class:`MetadataUnavailable`, whose message names
the path and what happened. A 404 is not a failure: on the notice paths it is the
normal answer ("no notice yet").
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from daemon.notices.wire import (
    MAX_BODY_BYTES,
    AnswerTooLarge,
    MetadataUnavailable,
    connect,
    parse_base_url,
    read_answer,
)

log = structlog.get_logger(__name__)

DEFAULT_URL = "http://169.254.169.254"
"""The link-local address of the metadata service on every EC2 instance."""

TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MIN_TOKEN_TTL = 1
MAX_TOKEN_TTL = 21600
"""A session token lives 1 second to 6 hours; AWS answers 400 to anything else."""

META_DATA_PREFIX = "/latest/meta-data/"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
TERMINATION_TIME_PATH = "/latest/meta-data/spot/termination-time"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
SCHEDULED_EVENTS_PATH = "/latest/meta-data/events/maintenance/scheduled"
INSTANCE_ID_PATH = "/latest/meta-data/instance-id"
INSTANCE_TYPE_PATH = "/latest/meta-data/instance-type"
INSTANCE_LIFE_CYCLE_PATH = "/latest/meta-data/instance-life-cycle"
REGION_PATH = "/latest/meta-data/placement/region"
AVAILABILITY_ZONE_PATH = "/latest/meta-data/placement/availability-zone"


@dataclass
class ClientStats:
    """What one client has sent; read by status and the benchmarks."""

    requests: int = 0
    token_fetches: int = 0
    connections: int = 0
    failures: int = 0

    def to_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for state.json and benchmark output)."""
        return asdict(self)


def token_refresh_margin(ttl: int) -> float:
    """How long before expiry a token is replaced: 10% of its TTL, at most 60 s."""
    return min(60.0, 0.1 * ttl)


class _StaleConnection(Exception):
    """A kept-alive connection was closed by the server before it answered."""


class ImdsClient:
    """An IMDSv2 client: cached token, one persistent connection, precise timeouts.

    ``connect_timeout`` bounds the TCP connect, ``read_timeout`` each wait for bytes
    afterwards (sending the request, the status line, the body). Thread-safe: requests
    are serialised on one connection.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token_ttl: int = MAX_TOKEN_TTL,
        connect_timeout: float = 0.5,
        read_timeout: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        host, port = parse_base_url(base_url)
        if not MIN_TOKEN_TTL <= token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token_ttl {token_ttl} is outside {MIN_TOKEN_TTL}..{MAX_TOKEN_TTL}")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.base_url = base_url.rstrip("/")
        self.token_ttl = token_ttl
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._host = host
        self._port = port
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._conn_requests = 0
        self._token: str | None = None
        self._token_refresh_at = 0.0
        self._token_expires_at = 0.0
        self._last_ttl_header: str | None = None
        self.stats = ClientStats()

    # -- public ---------------------------------------------------------------------

    def get(self, path: str) -> tuple[int, str]:
        """GET a metadata path: ``(200, body)`` or ``(404, "")``; anything else raises.

        A 401 means the token is no longer known (expired early, or the service
        restarted): the client fetches a new one and retries the GET once.
        """
        with self._lock:
            try:
                status, reason, body = self._get_with_token(path)
                if status == 401:
                    log.info("imds_token_rejected", path=path)
                    self._token = None
                    status, reason, body = self._get_with_token(path)
            except MetadataUnavailable:
                self.stats.failures += 1
                raise
            if status == 404:
                # 404 is normal here: the item does not exist (no notice yet).
                return 404, ""
            if status != 200:
                self.stats.failures += 1
                raise MetadataUnavailable(path, f"HTTP {status} {reason}".rstrip(), status=status)
            try:
                return 200, body.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.stats.failures += 1
                raise MetadataUnavailable(path, f"body is not UTF-8: {exc}", status=200) from None

    def get_text(self, path: str) -> str | None:
        """The item's text, or None when the item does not exist (404)."""
        status, body = self.get(path)
        return body if status == 200 else None

    def get_json(self, path: str) -> Any | None:
        """The item parsed as JSON, or None on 404; a body that is not JSON raises."""
        text = self.get_text(path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            with self._lock:
                self.stats.failures += 1
            raise MetadataUnavailable(
                path, f"malformed JSON ({exc}): {text[:80]!r}", status=200
            ) from None

    def close(self) -> None:
        """Close the connection; the next request opens a new one. The token is kept."""
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> ImdsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- token ----------------------------------------------------------------------

    def _get_with_token(self, path: str) -> tuple[int, str, bytes]:
        token = self._ensure_token()
        return self._request("GET", path, {TOKEN_HEADER: token})

    def _ensure_token(self) -> str:
        now = self._clock()
        if self._token is not None and now < self._token_refresh_at:
            return self._token
        try:
            return self._fetch_token(now)
        except MetadataUnavailable as exc:
            if self._token is not None and now < self._token_expires_at - 1.0:
                # The refresh is early on purpose; a failed one leaves the old token
                # good for a while yet, so the poll goes on and the next one retries.
                log.info("imds_token_refresh_failed", error=str(exc))
                return self._token
            raise

    def _fetch_token(self, now: float) -> str:
        status, reason, body = self._request(
            "PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(self.token_ttl)}
        )
        if status != 200:
            raise MetadataUnavailable(
                TOKEN_PATH, f"token request got HTTP {status} {reason}".rstrip(), status=status
            )
        token = body.decode("ascii", errors="replace").strip()
        if not token:
            raise MetadataUnavailable(TOKEN_PATH, "token request got an empty token", status=status)
        ttl = self.token_ttl
        echoed = self._last_ttl_header
        if echoed is not None and echoed.isdigit() and 0 < int(echoed) < ttl:
            # The service may grant less than asked; trust what it says.
            ttl = int(echoed)
        self._token = token
        # Counted from before the PUT was sent, so the token is never used past its life.
        self._token_refresh_at = now + ttl - token_refresh_margin(ttl)
        self._token_expires_at = now + ttl
        self.stats.token_fetches += 1
        log.info("imds_token_fetched", ttl=ttl, fetches=self.stats.token_fetches)
        return token

    # -- transport ------------------------------------------------------------------

    def _connect(self, path: str) -> http.client.HTTPConnection:
        conn = connect(self._host, self._port, self.connect_timeout, path)
        assert conn.sock is not None
        # Past the connect, every wait for the service is bounded by the read timeout.
        conn.sock.settimeout(self.read_timeout)
        self.stats.connections += 1
        self._conn_requests = 0
        return conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
        try:
            return self._request_once(method, path, headers)
        except _StaleConnection:
            # The server closed a kept-alive connection while it was idle (normal for
            # keep-alive); one retry on a fresh connection, which raises if it fails too.
            log.debug("imds_reconnect", path=path)
            return self._request_once(method, path, headers)

    def _request_once(
        self, method: str, path: str, headers: dict[str, str]
    ) -> tuple[int, str, bytes]:
        if self._conn is None or self._conn.sock is None:
            self._drop_connection()
            self._conn = self._connect(path)
        conn = self._conn
        reused = self._conn_requests > 0
        self._conn_requests += 1
        self.stats.requests += 1
        try:
            resp, body = read_answer(conn, method, path, headers)
        except AnswerTooLarge:
            self._drop_connection()
            raise
        except TimeoutError:
            self._drop_connection()
            hint = ""
            if path == TOKEN_PATH:
                # The classic cause: a container behind a bridge with the instance's
                # PUT response hop limit at 1; the answer never reaches it.
                hint = "; if this runs in a container, check the metadata hop limit"
            raise MetadataUnavailable(
                path, f"no response within {self.read_timeout:g} s (read timeout){hint}"
            ) from None
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            self._drop_connection()
            if reused:
                raise _StaleConnection() from exc
            raise MetadataUnavailable(
                path, f"connection closed without a response ({exc})"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            raise MetadataUnavailable(
                path, f"HTTP exchange failed: {type(exc).__name__}: {exc}"
            ) from None
        if resp.will_close:
            self._drop_connection()
        self._last_ttl_header = resp.getheader(TOKEN_TTL_HEADER)
        return resp.status, resp.reason or "", body


__all__ = [
    "AVAILABILITY_ZONE_PATH",
    "DEFAULT_URL",
    "INSTANCE_ACTION_PATH",
    "INSTANCE_ID_PATH",
    "INSTANCE_LIFE_CYCLE_PATH",
    "INSTANCE_TYPE_PATH",
    "MAX_BODY_BYTES",
    "MAX_TOKEN_TTL",
    "META_DATA_PREFIX",
    "MIN_TOKEN_TTL",
    "REBALANCE_PATH",
    "REGION_PATH",
    "SCHEDULED_EVENTS_PATH",
    "TERMINATION_TIME_PATH",
    "TOKEN_HEADER",
    "TOKEN_PATH",
    "TOKEN_TTL_HEADER",
    "ClientStats",
    "ImdsClient",
    "MetadataUnavailable",
    "parse_base_url",
    "token_refresh_margin",
]
