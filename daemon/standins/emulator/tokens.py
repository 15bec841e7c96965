"""IMDSv2 session tokens: ``PUT /latest/api/token`` mints them, every metadata GET needs one.

As AWS documents it: a TTL of 1..21600 s in ``X-aws-ec2-metadata-token-ttl-seconds``
(400 without a valid one), 403 when the PUT carries ``X-Forwarded-For`` (so a proxy on
the instance cannot mint tokens), and no v1 fallback: a GET without a live token is
refused by :mod:`.aws`, which asks :meth:`TokenStore.valid`.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from email.message import Message

from daemon.notices import imds
from daemon.standins.emulator.server import Reply


class TokenStore:
    """The tokens issued and when each expires, on the emulator's clock and lock."""

    def __init__(self, lock: threading.Lock, clock: Callable[[], float]) -> None:
        self._lock = lock
        self._clock = clock
        self._tokens: dict[str, float] = {}
        self.issued = 0  # counted under the lock; the emulator's stats read and reset it

    def answer_put(self, method: str, headers: Message) -> Reply:
        """The answer to a request on the token path."""
        if method != "PUT":
            return Reply(405, b"Method Not Allowed", headers=(("Allow", "PUT"),))
        if headers.get("X-Forwarded-For") is not None:
            # AWS refuses token requests that went through a proxy.
            return Reply(403, b"Forbidden")
        raw = headers.get(imds.TOKEN_TTL_HEADER)
        if raw is None or not raw.strip().isdigit():
            return Reply(400, b"Bad Request")
        ttl = int(raw.strip())
        if not imds.MIN_TOKEN_TTL <= ttl <= imds.MAX_TOKEN_TTL:
            return Reply(400, b"Bad Request")
        token = secrets.token_urlsafe(42)
        now = self._clock()
        with self._lock:
            # Drop dead tokens as new ones come in, so a long demo does not grow the map.
            for dead in [t for t, exp in self._tokens.items() if exp <= now]:
                del self._tokens[dead]
            self._tokens[token] = now + ttl
            self.issued += 1
        return Reply(200, token.encode(), headers=((imds.TOKEN_TTL_HEADER, str(ttl)),))

    def valid(self, token: str | None) -> bool:
        """Whether ``token`` was issued and has not expired (an expired one is dropped)."""
        now = self._clock()
        with self._lock:
            expiry = self._tokens.get(token) if token else None
            if token and expiry is not None and expiry <= now:
                del self._tokens[token]
                expiry = None
        return expiry is not None

    def expire_all(self) -> None:
        """Forget every token, as after expiry or a restart of the service."""
        with self._lock:
            self._tokens.clear()
