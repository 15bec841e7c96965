"""What the fault proxy saw: one record per request, and its counters since start.

Plain values, filled in by :mod:`.proxy` and :mod:`.connection`, read by the tests
(:meth:`FaultProxy.records`, :meth:`FaultProxy.stats`) and served as JSON on the
control API (``GET /__faultproxy__/stats``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
    checksum_rejected: int = 0  # requests refused with BadDigest (verify_checksums)
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
            "checksum_rejected": self.checksum_rejected,
            "throttled_seconds": round(self.throttled_seconds, 3),
            "shaped_seconds": round(self.shaped_seconds, 3),
        }
