"""Relaying one message body with the faults that act on it: flips, a cut, pacing.

:class:`BodyPlan` applies a request's or a response's ``corrupt``, ``reset`` and
``throttle`` rules (and the connection's shaped link) to the bytes as they pass;
:func:`relay_chunked` and :func:`relay_length` move a body in either framing. Which
rules fire is decided before (:func:`.rules.choose`); here they are only carried out.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from daemon.standins.faultproxy.checksums import BadDigest, BodyChecksum
from daemon.standins.faultproxy.rules import Rule
from daemon.standins.faultproxy.shaping import TokenBucket
from daemon.standins.faultproxy.wire import BUF, Reader

if TYPE_CHECKING:
    from daemon.standins.faultproxy.proxy import FaultProxy


class Stopped(Exception):
    """The proxy is stopping: drop the connection."""


class Reset(Exception):
    """A reset rule says: cut the client connection now, with an RST."""


class BodyPlan:
    """The faults acting on one body: where to flip bytes, where to cut, how fast to go."""

    def __init__(
        self,
        proxy: FaultProxy,
        corrupt: Rule | None,
        reset: Rule | None,
        throttles: list[Rule],
        total: int | None,
        link: TokenBucket | None = None,
        checksum: BodyChecksum | None = None,
    ) -> None:
        self._proxy = proxy
        self.offset = 0
        self._total = total
        # The body's last byte waits for the checksum's verdict (see .checksums).
        self._checksum = checksum if total else None
        self._held = b""
        self._link = link  # the connection's own bandwidth (shaping)
        self._corrupt = (
            (corrupt.after_bytes, corrupt.after_bytes + corrupt.nbytes) if corrupt else None
        )
        self._cut: int | None = None
        if reset is not None:
            # Always short of the end, so the peer never gets a whole body.
            self._cut = reset.after_bytes if total is None else min(reset.after_bytes, total - 1)
            self._cut = max(self._cut, 0)
        self._buckets = [r.bucket for r in throttles if r.bucket is not None]

    def check_cut(self) -> None:
        """Reset now when the cut is due (called before the body and at its end)."""
        if self._cut is not None and self.offset >= self._cut:
            raise Reset

    def end_of_body(self) -> None:
        """The body ends here: a planned reset that is not done yet happens now."""
        if self._cut is not None:
            raise Reset

    def send(self, dst: socket.socket, data: bytes) -> None:
        """Send body bytes ``data`` to ``dst``, with the plan's faults applied."""
        plain = not (self._buckets or self._link or self._cut is not None or self._corrupt)
        if plain and self._checksum is None:
            dst.sendall(data)  # the common case under shaping alone: no copies
            self.offset += len(data)
            return
        view = memoryview(data)
        while view:
            n = len(view)
            if self._cut is not None:
                if self.offset >= self._cut:
                    raise Reset
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
            if self._checksum is not None:
                self._checksum.update(piece)  # what the server gets, flips included
                if self.offset + n == self._total:
                    self._held, piece = bytes(piece[-1:]), piece[:-1]
            dst.sendall(piece)
            self.offset += n

    def release_held(self, dst: socket.socket) -> None:
        """The body was relayed but its last byte: send it if the body matches its
        checksum, else :class:`BadDigest` (the caller cuts the server's request short)."""
        if self._checksum is None:
            return
        if not self._checksum.matches():
            raise BadDigest(self._checksum)
        dst.sendall(self._held)


def relay_chunked(src: Reader, dst: socket.socket | None, plan: BodyPlan | None) -> None:
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
            data = src.read_some(min(left, BUF))
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


def relay_length(src: Reader, dst: socket.socket, plan: BodyPlan, length: int | None) -> bool:
    """Relay ``length`` bytes (None: until EOF); whether the source reached EOF."""
    plan.check_cut()
    left = length
    while left is None or left > 0:
        data = src.read_some(BUF if left is None else min(left, BUF))
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
