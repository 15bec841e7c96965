"""A plain HTTP client for the GCE metadata server and Azure's Instance Metadata Service.

Both take a fixed header on every request (``Metadata-Flavor: Google``, ``Metadata:
true``) and no token, so this is much smaller than :class:`~daemon.notices.imds.ImdsClient`.
One instance is one HTTP/1.1 connection, used by one thread: the sources that hang on a
request (GCP's ``wait_for_change``) each own one, so a request that hangs never holds up
another. :meth:`MetadataHttp.abort` may be called from any thread and ends a request
under way at once (the stop of a hanging GET).

Every failure raises :class:`~daemon.notices.imds.MetadataUnavailable` naming the path;
a connection the server closed without an answer is :class:`MetadataDropped`, which the
hanging sources retry at once.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from daemon.notices.imds import (
    AVAILABILITY_ZONE_PATH,
    INSTANCE_ID_PATH,
    INSTANCE_LIFE_CYCLE_PATH,
    INSTANCE_TYPE_PATH,
    REGION_PATH,
)
from daemon.notices.wire import (
    AnswerTooLarge,
    MetadataUnavailable,
    connect,
    parse_base_url,
    read_answer,
)


class MetadataDropped(MetadataUnavailable):
    """The server closed the connection without answering (a dropped hanging GET)."""


@dataclass(frozen=True)
class Answer:
    """One response: status, headers (names lower case) and the body as text."""

    status: int
    headers: dict[str, str]
    body: str


class MetadataHttp:
    """One persistent connection to ``base_url`` (``http://host[:port]``, as the config
    validates), sending ``headers`` with every request."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        connect_timeout: float = 0.5,
        read_timeout: float = 2.0,
    ) -> None:
        self._host, self._port = parse_base_url(base_url)
        self.base_url = base_url.rstrip("/")
        self._headers = dict(headers)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()  # guards _conn against abort() from another thread
        self._aborted = False
        self.requests = 0

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        read_timeout: float | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request; an Answer for any HTTP status, MetadataUnavailable otherwise."""
        timeout = self.read_timeout if read_timeout is None else read_timeout
        headers = {**self._headers, **(extra_headers or {})}
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        for attempt in (1, 2):
            conn, reused = self._connection(path)
            assert conn.sock is not None
            conn.sock.settimeout(timeout)
            self.requests += 1
            try:
                resp, data = read_answer(conn, method, path, headers, body)
            except AnswerTooLarge:
                self.close()
                raise
            except TimeoutError:
                self.close()
                raise MetadataUnavailable(
                    path, f"no response within {timeout:g} s (read timeout)"
                ) from None
            except (
                http.client.RemoteDisconnected,
                http.client.IncompleteRead,
                ConnectionResetError,
                BrokenPipeError,
            ) as exc:
                self.close()
                if reused and attempt == 1 and not self._aborted:
                    continue  # a kept-alive connection the server had closed: once more
                raise MetadataDropped(
                    path, f"connection closed without a response ({type(exc).__name__})"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if self._aborted:
                    raise MetadataDropped(path, "request aborted (stopping)") from None
                raise MetadataUnavailable(
                    path, f"HTTP exchange failed: {type(exc).__name__}: {exc}"
                ) from None
            if resp.will_close:
                self.close()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MetadataUnavailable(
                    path, f"body is not UTF-8: {exc}", status=resp.status
                ) from None
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, text)
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self, path: str) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._aborted:
                raise MetadataDropped(path, "request aborted (stopping)")
            if self._conn is not None and self._conn.sock is not None:
                return self._conn, True
        conn = connect(self._host, self._port, self.connect_timeout, path)
        with self._lock:
            if self._aborted:
                conn.close()
                raise MetadataDropped(path, "request aborted (stopping)")
            self._conn = conn
        return conn, False

    def abort(self) -> None:
        """End the request under way (from any thread) and refuse further ones."""
        with self._lock:
            self._aborted = True
            conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection; the next request opens a new one."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


__all__ = ["Answer", "MetadataDropped", "MetadataHttp"]


Item = tuple[str, Callable[[str], str]]
"""Another cloud's own path for an item, and what turns its answer into EC2's form."""


class MappedMetadata:
    """Another cloud's metadata service, asked by EC2 metadata paths (the ones the run
    ledger and :func:`daemon.nodes.instance_identity` read), each mapped to that cloud's
    own path and a transform of its answer. Any other path: None."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        instance_id: Item,
        instance_type: Item,
        availability_zone: Item,
        region: Item,
        lifecycle: Item,
    ) -> None:
        self._base_url = base_url
        self._headers = dict(headers)
        self._mapping: dict[str, Item] = {
            INSTANCE_ID_PATH: instance_id,
            INSTANCE_TYPE_PATH: instance_type,
            AVAILABILITY_ZONE_PATH: availability_zone,
            REGION_PATH: region,
            INSTANCE_LIFE_CYCLE_PATH: lifecycle,
        }

    def get_text(self, path: str) -> str | None:
        """The item for an EC2 metadata path; None when the service has none (404, empty)."""
        mapped = self._mapping.get(path)
        if mapped is None:
            return None
        own_path, transform = mapped
        http = MetadataHttp(self._base_url, self._headers)
        try:
            answer = http.request("GET", own_path)
        finally:
            http.close()
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise MetadataUnavailable(own_path, f"HTTP {answer.status}", status=answer.status)
        text = answer.body.strip()
        return transform(text) if text else None
