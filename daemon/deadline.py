"""Deadlines: the notice's wall-clock ``time`` turned into the supervisor's monotonic clock.

The drain deadline is when the trainer must be gone so the emergency checkpoint can
still be uploaded and committed before the machine goes::

    drain_deadline = notice_deadline - safety_margin - upload_reserve
    upload_reserve = min(newest checkpoint bytes / upload throughput,
                         MAX_RESERVE_SHARE * (notice_deadline - safety_margin - now))
    cancel_deadline = notice_deadline - safety_margin

The throughput is an EWMA of this run's uploads; before the first one is measured it is
:data:`DEFAULT_THROUGHPUT_BPS` (50 MB/s), a deliberately low figure (one S3 connection
alone carries more), so the first reserve errs on the side of time to upload.

The reserve never takes more than half of the time left. However large the checkpoint
and however slow the link, the trainer keeps at least half the window to finish its
save on local disk: a local interrupt checkpoint is worth having even when it cannot be
uploaded in time, because the next boot commits it if the instance (or its disk)
survives, as after ``systemctl stop`` or a reboot. Without the cap, a large checkpoint
against a short ``stop_budget`` put the drain deadline in the past, and the trainer was
SIGKILLed at once, mid-save.

At the drain deadline the trainer's process tree is killed; at the cancel deadline every
upload still running is cancelled (and its multipart upload aborted), so the machine
never goes away in the middle of a commit.

Everything is computed on ``time.monotonic()``, so a clock step (NTP) after the notice
cannot move the deadline.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass

# Before the first upload is measured, assume a modest 50 MB/s: an instance's S3
# throughput is usually far higher, so the reserve errs on the side of time to upload.
DEFAULT_THROUGHPUT_BPS = 50e6
_EWMA_ALPHA = 0.3
MAX_RESERVE_SHARE = 0.5
"""The upload reserve takes at most this share of the time left before the cancel deadline."""


class ThroughputEstimate:
    """An exponentially weighted moving average of upload throughput, in bytes per second."""

    def __init__(self, initial_bps: float = DEFAULT_THROUGHPUT_BPS) -> None:
        self._bps = initial_bps
        self._measured = False
        self._lock = threading.Lock()

    def record(self, nbytes: int, seconds: float) -> None:
        """Add one upload; tiny uploads say more about latency than bandwidth, so skip them."""
        if nbytes < 1_000_000 or seconds <= 0:
            return
        sample = nbytes / seconds
        with self._lock:
            self._bps = (
                sample
                if not self._measured
                else (_EWMA_ALPHA * sample + (1 - _EWMA_ALPHA) * self._bps)
            )
            self._measured = True

    @property
    def bytes_per_second(self) -> float:
        with self._lock:
            return self._bps

    @property
    def measured(self) -> bool:
        return self._measured

    def seconds_for(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_second


@dataclass(frozen=True)
class DrainPlan:
    """The numbers behind one drain decision (all logged)."""

    notice_deadline: float  # monotonic
    drain_deadline: float  # monotonic: SIGKILL of the trainer's tree
    safety_margin: float
    upload_reserve: float
    reserve_bytes: int
    throughput_mbps: float
    throughput_measured: bool = False  # False: the default guess, no upload measured yet
    reserve_capped: bool = False  # the reserve wanted more than MAX_RESERVE_SHARE of the time

    @property
    def cancel_deadline(self) -> float:
        """Monotonic: uploads still running then are cancelled (notice less the margin)."""
        return self.notice_deadline - self.safety_margin

    def seconds_left(self, now: float | None = None) -> float:
        """Seconds until the drain deadline (negative once it passed)."""
        return self.drain_deadline - (time.monotonic() if now is None else now)

    def cancel_in(self, now: float | None = None) -> float:
        """Seconds until the cancel deadline (negative once it passed)."""
        return self.cancel_deadline - (time.monotonic() if now is None else now)

    def as_fields(self, now: float | None = None) -> dict[str, float | int]:
        t = time.monotonic() if now is None else now
        return {
            "notice_in_s": round(self.notice_deadline - t, 3),
            "drain_in_s": round(self.drain_deadline - t, 3),
            "cancel_in_s": round(self.cancel_deadline - t, 3),
            "safety_margin_s": self.safety_margin,
            "upload_reserve_s": round(self.upload_reserve, 3),
            "reserve_bytes": self.reserve_bytes,
            "throughput_mbps": round(self.throughput_mbps, 2),
            "throughput_measured": self.throughput_measured,
            "reserve_capped": self.reserve_capped,
        }


def wall_to_monotonic(
    when: dt.datetime, now_wall: float | None = None, now_mono: float | None = None
) -> float:
    """A UTC wall-clock instant as a ``time.monotonic()`` value (past instants stay past)."""
    wall = time.time() if now_wall is None else now_wall
    mono = time.monotonic() if now_mono is None else now_mono
    return mono + (when.timestamp() - wall)


def plan_drain(
    notice_deadline: float,
    safety_margin: float,
    reserve_bytes: int,
    throughput: ThroughputEstimate,
    now: float | None = None,
) -> DrainPlan:
    """Work back from the notice deadline to when the trainer must be gone."""
    t = time.monotonic() if now is None else now
    wanted = throughput.seconds_for(reserve_bytes)
    cap = max(MAX_RESERVE_SHARE * (notice_deadline - safety_margin - t), 0.0)
    reserve = min(wanted, cap)
    return DrainPlan(
        notice_deadline=notice_deadline,
        drain_deadline=notice_deadline - safety_margin - reserve,
        safety_margin=safety_margin,
        upload_reserve=reserve,
        reserve_bytes=reserve_bytes,
        throughput_mbps=throughput.bytes_per_second / 1e6,
        throughput_measured=throughput.measured,
        reserve_capped=wanted > cap,
    )
