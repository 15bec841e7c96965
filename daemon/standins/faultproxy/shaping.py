"""Pacing: the token bucket behind ``throttle`` rules, and the S3-on-AWS shaping mode.

:class:`Shaping` (``--shape``) makes every connection behave as one to S3 on AWS: a
first-byte latency and a bandwidth cap of its own, each way, so that a client's
throughput grows with its number of connections instead of with whatever loopback
allows. The benchmarks run through it (``bench/servers.py``). Where the numbers come
from is said beside them. Applying the pacing to bytes is :mod:`.body`'s job.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

# S3 Standard's first-byte latency for small objects is tens of milliseconds: AWS's
# performance guidelines speak of "100-200 milliseconds" only for the tail, and present
# S3 Express One Zone's "single-digit millisecond" access as "up to 10x faster" than S3
# Standard. 30 ms is the middle of that range, as seen from an EC2 instance in-region.
DEFAULT_FIRST_BYTE_LATENCY = 0.030
# "Make one concurrent request for each 85-90 MB/s of desired network throughput" (AWS,
# "Performance design patterns for Amazon S3"): one S3 connection carries about 90 MB/s.
DEFAULT_CONNECTION_RATE = 90e6


class TokenBucket:
    """``rate`` bytes per second with a burst of ``burst_s`` seconds, shared by threads."""

    def __init__(self, rate: float, burst_s: float = 0.1) -> None:
        self.rate = float(rate)
        self.burst = max(1024.0, self.rate * burst_s)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def piece(self) -> int:
        """The largest write that keeps the pacing smooth."""
        return max(1, int(self.burst))

    def reserve(self, n: int) -> float:
        """Take ``n`` tokens (going into debt); the seconds to wait before sending."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


# A connection's own links, one per direction (up, down); None where not shaped.
Links = tuple[TokenBucket | None, TokenBucket | None]


@dataclass(frozen=True)
class Shaping:
    """S3 as AWS serves it, roughly: every connection is a link of its own.

    ``first_byte_latency``: seconds from the end of a request to the first byte of its
    answer (the upstream's own time counts towards it). ``connection_rate``: bytes per
    second each connection carries, each way (request bodies up, response bodies down).
    Either may be 0 to leave it out. Sources in :data:`DEFAULT_FIRST_BYTE_LATENCY` and
    :data:`DEFAULT_CONNECTION_RATE`.
    """

    first_byte_latency: float = DEFAULT_FIRST_BYTE_LATENCY
    connection_rate: float = DEFAULT_CONNECTION_RATE

    def __post_init__(self) -> None:
        if self.first_byte_latency < 0 or self.connection_rate < 0:
            raise ValueError("shaping latency and rate must not be negative")

    def to_dict(self) -> dict[str, float]:
        return {
            "first_byte_latency_ms": round(self.first_byte_latency * 1000, 3),
            "connection_mb_per_s": round(self.connection_rate / 1e6, 3),
        }


def connection_links(shaping: Shaping | None) -> Links:
    """A new connection's own links (up, down) under ``shaping``, if any."""
    if shaping is None or shaping.connection_rate <= 0:
        return None, None
    # A burst of 10 ms: short enough that even a small object feels the rate.
    return (
        TokenBucket(shaping.connection_rate, burst_s=0.01),
        TokenBucket(shaping.connection_rate, burst_s=0.01),
    )
