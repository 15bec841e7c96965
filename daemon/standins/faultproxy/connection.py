"""Serving one client connection, request by request: choose the rules, then answer.

An ``error`` is answered here, in S3's XML and wording, without forwarding; anything
else goes to the server through the connection's :class:`.upstream.Upstream`, with the
first-byte latency of the shaping and any ``stall`` before the answer is relayed.
``Expect: 100-continue`` is answered here too and never passed upstream. Each request
ends as one :class:`.stats.RequestRecord`. Control requests go to :mod:`.control`.
"""

from __future__ import annotations

import re
import socket
import time
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from daemon.standins.faultproxy.body import Reset, Stopped, relay_chunked
from daemon.standins.faultproxy.checksums import BAD_DIGEST_CODE, BadDigest, BodyChecksum
from daemon.standins.faultproxy.control import CONTROL_PREFIX, serve_control
from daemon.standins.faultproxy.rules import Phase, Rule
from daemon.standins.faultproxy.shaping import Links
from daemon.standins.faultproxy.stats import RequestRecord
from daemon.standins.faultproxy.upstream import Upstream
from daemon.standins.faultproxy.wire import (
    BUF,
    HOP_BY_HOP,
    IDLE_TIMEOUT,
    IO_TIMEOUT,
    Message,
    Reader,
    hard_reset,
    no_body,
    parse_head,
    render_head,
)

if TYPE_CHECKING:
    from daemon.standins.faultproxy.proxy import FaultProxy

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


class ClientConnection:
    """One accepted client connection and its upstream connection, opened lazily."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, links: Links) -> None:
        self._proxy = proxy
        self._client = client
        self._reader = Reader(client)
        self._up = Upstream(proxy)
        self._links = links

    def serve(self) -> None:
        """Serve requests until the client leaves, a request says close, or a reset."""
        try:
            while not self._proxy._stopping.is_set():
                self._client.settimeout(IDLE_TIMEOUT)
                head = self._reader.read_head()
                if head is None:
                    return
                self._client.settimeout(IO_TIMEOUT)
                if not self._serve_request(parse_head(head)):
                    return
        except Reset:
            hard_reset(self._client)
        except (OSError, ValueError, Stopped):
            pass  # the client went away, sent garbage, or we are stopping: drop it
        finally:
            self._up.close()

    def _serve_request(self, req: Message) -> bool:
        """Serve one request; whether the client connection may serve another."""
        proxy, client, reader, up = self._proxy, self._client, self._reader, self._up
        try:
            method, target, version = req.first.split(" ", 2)
        except ValueError as exc:
            raise ValueError(f"malformed request line {req.first!r}") from exc
        started = time.monotonic()
        if target.startswith(CONTROL_PREFIX):  # not counted: the stats are about the traffic
            return serve_control(proxy, client, reader, req, method, target, version)
        number = proxy._begin_request()
        chosen = proxy._choose(method, target)
        chosen.link_up, chosen.link_down = self._links
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
            proxy._end_request(rec)

        try:
            expects = "100-continue" in (req.get("expect") or "").lower()
            keep = not req.wants_close(version)
            if chosen.error is not None:
                status = chosen.error.status
                if expects:
                    # The body has not been sent and never will be: close after answering.
                    self._send_error(chosen.error, number, method, target, close=True)
                    return False
                self._drain_body(req)
                self._send_error(chosen.error, number, method, target, close=not keep)
                return keep

            cut_request = chosen.reset is not None and chosen.reset.phase is Phase.REQUEST
            if cut_request and not req.chunked() and not req.content_length():
                raise Reset  # no body to cut short: drop the request before any answer
            if expects and proxy.answer_continue:
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            checksum = None
            if proxy.verify_checksums and method.upper() == "PUT" and not req.chunked():
                checksum = BodyChecksum.of(req.headers)
            proxy._count_forwarded()
            try:
                up.send_request(req, method, target, version, reader, chosen, checksum)
            except BadDigest as exc:
                # The whole body was read: the client connection can serve another.
                status = 400
                proxy._count_rejected()
                self._send_xml_error(
                    400, BAD_DIGEST_CODE, str(exc), number, method, target, close=not keep
                )
                return keep
            sent = time.monotonic()
            resp, resp_version = up.read_response_head()
            latency = proxy.shaping.first_byte_latency if proxy.shaping is not None else 0.0
            if latency > 0:
                # The upstream's own time counts: the answer starts `latency` after the request.
                wait = latency - (time.monotonic() - sent)
                if wait > 0:
                    proxy._sleep(wait)
                    proxy._count_shaped(wait)
            status = int(resp.first.split(" ", 2)[1])
            if chosen.stall is not None:
                proxy._sleep(chosen.stall.seconds)
            # moto (werkzeug) closes after every answer; the client side stays alive
            # anyway, as it would against S3, whenever the body has a known end.
            delimited = (
                no_body(method, status) or resp.chunked() or resp.content_length() is not None
            )
            keep = keep and delimited
            headers = [
                *resp.without(HOP_BY_HOP),
                ("Connection", "keep-alive" if keep else "close"),
            ]
            _version, _, rest = resp.first.partition(" ")
            client.sendall(render_head("HTTP/1.1 " + rest, headers))
            up.relay_response_body(resp, method, status, client, chosen)
            if not delimited or resp.wants_close(resp_version):
                up.close()
            return keep
        except Reset:
            status = None
            raise
        finally:
            record()

    def _drain_body(self, req: Message) -> None:
        if req.chunked():
            relay_chunked(self._reader, None, None)
            return
        left = req.content_length() or 0
        while left > 0:
            data = self._reader.read_some(min(left, BUF))
            if not data:
                raise ConnectionError("client closed inside a request body")
            left -= len(data)

    def _send_error(
        self, rule: Rule, number: int, method: str, target: str, *, close: bool
    ) -> None:
        message = rule.message or _DEFAULT_MESSAGES.get(rule.code, rule.code)
        self._send_xml_error(rule.status, rule.code, message, number, method, target, close=close)

    def _send_xml_error(
        self,
        status: int,
        code: str,
        message: str,
        number: int,
        method: str,
        target: str,
        *,
        close: bool,
    ) -> None:
        request_id = f"faultproxy-{number:08d}"
        resource = target.split("?", 1)[0]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
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
        first = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"
        self._client.sendall(render_head(first, headers) + body)
