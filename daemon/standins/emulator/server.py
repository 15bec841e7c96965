"""The emulator's HTTP core: the threaded HTTP/1.1 server, the handler, an answer's shape.

The handler reads a request, sends control requests (``/_emulator/...``) to
:mod:`.control`, counts the others, applies a :class:`.faults.Fault` when one matches,
and otherwise sends what the emulator's provider answers (:class:`Reply`). What any
cloud answers is not here: see :mod:`.aws`, :mod:`.gce` and :mod:`.azure`.
"""

from __future__ import annotations

import http.client
import json
import secrets
import sys
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from daemon.standins.emulator.service import MetadataEmulator

CONTROL_PREFIX = "/_emulator/"


@dataclass(frozen=True)
class Reply:
    """One answer: status, body, its content type, other headers."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


# A handler's answer that is no answer: hang up (the emulator is stopping).
HANG_UP = Reply(0)


def json_reply(status: int, doc: Any) -> Reply:
    return Reply(status, json.dumps(doc).encode(), "application/json")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    emulator: MetadataEmulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up before a delayed answer is the point of a
        # delay fault, not an error worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1: connections are kept alive, as the real service keeps them.
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"
    sys_version = ""
    # Headers and body go out in two writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms a request), which no real service does.
    disable_nagle_algorithm = True

    @property
    def _em(self) -> MetadataEmulator:
        return cast(Server, self.server).emulator

    def setup(self) -> None:
        super().setup()
        self._em._connected(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._em._disconnected(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        # The emulator's own events are logged; per-request lines would drown them.
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        em = self._em
        parts = urlsplit(self.path)
        path = parts.path
        body = self._read_body()
        if path.startswith(CONTROL_PREFIX):
            self._send(em._control(self.command, path, body))
            return
        em._count(self.command, path)
        fault = em._take_fault(self.command, path)
        if fault is not None:
            if fault.delay_s > 0 and em._stopping.wait(fault.delay_s):
                self.close_connection = True
                return
            if fault.kind == "close":
                # Hang up without a byte of answer.
                self.close_connection = True
                return
            if fault.kind == "status":
                phrase = http.client.responses.get(fault.status, "Error")
                self._send(Reply(fault.status, phrase.encode()))
                return
            if fault.kind == "malformed":
                self._send(Reply(200, fault.body.encode()))
                return
        reply = em._answer_for(self.command, path, parts.query, self.headers, body)
        if reply is HANG_UP:
            self.close_connection = True
            return
        if fault is not None and fault.kind == "etag":
            wrong = ("ETag", "0000" + secrets.token_hex(6))
            reply = Reply(
                reply.status,
                reply.body,
                reply.content_type,
                (*(h for h in reply.headers if h[0] != "ETag"), wrong),
            )
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        self._em._count_response(reply.status)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)
