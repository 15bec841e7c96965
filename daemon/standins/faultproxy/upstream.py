"""The proxy's side towards the server: one upstream connection per client connection.

Opened lazily, reopened when the server closed it while idle, closed after a reset (the
server then gets half a request, then EOF). Sends the request head and body, reads the
answer's head and relays its body, each body through a :class:`.body.BodyPlan`.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING

from daemon.standins.faultproxy.body import BodyPlan, Reset, relay_chunked, relay_length
from daemon.standins.faultproxy.checksums import BadDigest, BodyChecksum
from daemon.standins.faultproxy.rules import Chosen, Phase
from daemon.standins.faultproxy.wire import (
    CONNECT_TIMEOUT,
    HOP_BY_HOP,
    IO_TIMEOUT,
    Message,
    Reader,
    dropped,
    no_body,
    parse_head,
    render_head,
)

if TYPE_CHECKING:
    from daemon.standins.faultproxy.proxy import FaultProxy


class Upstream:
    """The connection to the upstream server of one client connection, opened lazily."""

    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy
        self.sock: socket.socket | None = None
        self.reader: Reader | None = None
        self._reused = False

    def _connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection(self._proxy.upstream, timeout=CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(IO_TIMEOUT)
            self._proxy._track(sock, add=True)
            self.sock, self.reader = sock, Reader(sock)
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
        req: Message,
        method: str,
        target: str,
        version: str,
        client_reader: Reader,
        chosen: Chosen,
        checksum: BodyChecksum | None = None,
    ) -> None:
        """Send the request upstream. ``checksum``: the body's additional checksum, checked
        as S3 on AWS does (:mod:`.checksums`); :class:`BadDigest` when it does not match,
        and then the server got a request cut short of its last byte."""
        total = None if req.chunked() else (req.content_length() or 0)
        if checksum is not None and total == 0 and not checksum.matches():
            raise BadDigest(checksum)  # no byte to hold back: refused before it is sent
        head = render_head(f"{method} {target} HTTP/1.1", req.without(HOP_BY_HOP))
        if self.sock is not None and dropped(self.sock):
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
        plan = BodyPlan(self._proxy, corrupt, reset, throttles, total, chosen.link_up, checksum)
        try:
            if req.chunked():
                relay_chunked(client_reader, sock, plan)
            else:
                relay_length(client_reader, sock, plan, total)
                plan.release_held(sock)
        except (Reset, BadDigest):
            self.close()  # the server gets half a request, then EOF
            raise
        finally:
            self._proxy._count_bytes(up=plan.offset)

    def read_response_head(self) -> tuple[Message, str]:
        assert self.reader is not None
        while True:
            head = self.reader.read_head()
            if head is None:
                raise ConnectionError("upstream closed before answering")
            resp = parse_head(head)
            version, _, rest = resp.first.partition(" ")
            code = int(rest.split(" ", 1)[0])
            if code >= 200 or code == 101:
                self._reused = True
                return resp, version
            # 1xx: we never sent Expect upstream, but skip any informational answer.

    def relay_response_body(
        self, resp: Message, method: str, status: int, client: socket.socket, chosen: Chosen
    ) -> bool:
        """Relay the body; True when it was delimited by the server closing."""
        assert self.reader is not None
        corrupt, reset, throttles = chosen.body_rules(Phase.RESPONSE)
        bodiless = no_body(method, status)
        length = 0 if bodiless else (None if resp.chunked() else resp.content_length())
        plan = BodyPlan(self._proxy, corrupt, reset, throttles, length, chosen.link_down)
        try:
            if not bodiless and resp.chunked():
                relay_chunked(self.reader, client, plan)
                return False
            return relay_length(self.reader, client, plan, length)
        except Reset:
            self.close()
            raise
        finally:
            self._proxy._count_bytes(down=plan.offset)
