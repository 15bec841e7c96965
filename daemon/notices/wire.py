"""What every metadata client shares on the wire: the URL it may speak to, the failure it
raises, the bounded connect and the bounded read.

:class:`~daemon.notices.imds.ImdsClient` (AWS, with its token) and
:class:`~daemon.notices.metadata_http.MetadataHttp` (GCP and Azure, a fixed header) both
open their connection with :func:`connect` and read each answer with :func:`read_answer`,
so a refused connect, a connect that times out and an answer too large to buffer read
the same from every cloud. Retries, tokens and headers are the clients' own, not here.
"""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

MAX_BODY_BYTES = 64 * 1024
"""Metadata answers are small; anything larger is a fault, not something to buffer."""


class MetadataUnavailable(Exception):
    """The metadata service gave no usable answer for ``path``.

    ``status`` is the HTTP status when there was one (5xx, 429, 401 after a fresh
    token, or 200 with a body that does not parse), else None (refused, timed out,
    connection closed).
    """

    def __init__(self, path: str, reason: str, *, status: int | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.status = status


def parse_base_url(url: str) -> tuple[str, int]:
    """``(host, port)`` of a metadata URL; ValueError saying why it is not ``http://host[:port]``.

    The one place that decides what the client can speak: plain HTTP (the service has no
    TLS), to a host and port, with no path (the client appends the metadata paths). The
    config refuses at load time exactly what this refuses.
    """
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"{url!r} is not http://host[:port]: the client speaks plain http only")
    if not parts.hostname:
        raise ValueError(f"{url!r} is not http://host[:port]: it names no host")
    if parts.path not in ("", "/"):
        raise ValueError(f"{url!r} is not http://host[:port]: no path allowed ({parts.path!r})")
    try:
        port = parts.port
    except ValueError:  # not a number, or outside 0..65535
        raise ValueError(f"{url!r} is not http://host[:port]: bad port") from None
    if port == 0:
        raise ValueError(f"{url!r} is not http://host[:port]: port 0 is not a port")
    return parts.hostname, port or 80


def connect(host: str, port: int, timeout: float, path: str) -> http.client.HTTPConnection:
    """A connection to ``host:port`` within ``timeout`` seconds; MetadataUnavailable
    naming ``path`` (the request it was for) and why not."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
    except TimeoutError:
        conn.close()
        raise MetadataUnavailable(
            path, f"connect to {host}:{port} timed out after {timeout:g} s"
        ) from None
    except ConnectionRefusedError:
        conn.close()
        raise MetadataUnavailable(path, f"connection to {host}:{port} refused") from None
    except OSError as exc:
        conn.close()
        raise MetadataUnavailable(path, f"connect to {host}:{port} failed: {exc}") from None
    return conn


class AnswerTooLarge(MetadataUnavailable):
    """The answer was over :data:`MAX_BODY_BYTES`: the connection holds the rest of it."""


def read_answer(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None = None,
) -> tuple[http.client.HTTPResponse, bytes]:
    """Send one request and read its answer, at most :data:`MAX_BODY_BYTES` of it.

    The transport's own errors (timeouts, a closed connection) propagate for the caller to
    name; an answer over the limit raises :class:`AnswerTooLarge`. Either way the caller
    must drop the connection, which is left mid-answer.
    """
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise AnswerTooLarge(
            path, f"response larger than {MAX_BODY_BYTES} bytes", status=resp.status
        )
    return resp, data


__all__ = [
    "MAX_BODY_BYTES",
    "AnswerTooLarge",
    "MetadataUnavailable",
    "connect",
    "parse_base_url",
    "read_answer",
]
