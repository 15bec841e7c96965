"""Does a checkpoint fit in a cloud's notice? And if not, how often to save instead.

AWS warns two minutes ahead; GCP and Azure give 30 seconds. A checkpoint that takes
longer than that to upload cannot be committed after the notice, however fast the
trainer saves: what an interruption then costs is the work since the newest *periodic*
commit, and only a shorter checkpoint interval bounds it.

Pure functions (:func:`notice_budget`, :func:`emergency_decision`, :func:`advise`) and the
events that report them (:func:`log_startup_budget`, :func:`log_emergency_decision`);
``spot-supervisor check`` prints the same verdict (:mod:`daemon.preflight`).

The numbers: ``upload_s = bytes / throughput`` (the measured upload speed, else the
deliberately low default of :data:`daemon.deadline.DEFAULT_THROUGHPUT_BPS`);
``available_s = notice length - daemon.safety_margin`` (at startup), or the seconds left
until the cancel deadline (in a drain). The advice: save at least every
``2 * upload_s`` seconds (the uploads keep up with the saves, each one idle half the
time), so an interruption loses at most about one interval plus one upload.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon import layout
from daemon.deadline import DEFAULT_THROUGHPUT_BPS

log = structlog.get_logger(__name__)

MIN_ADVISED_INTERVAL_S = 60.0
"""Never advise saving more often than once a minute: below that the saves themselves
become the cost."""


@dataclass(frozen=True)
class Cadence:
    """How often the trainer saves, from its two newest checkpoints (None: unknown)."""

    steps_between: int | None = None
    seconds_between: float | None = None

    @property
    def seconds_per_step(self) -> float | None:
        if not self.steps_between or self.seconds_between is None or self.seconds_between <= 0:
            return None
        return self.seconds_between / self.steps_between


@dataclass(frozen=True)
class Budget:
    """One comparison of a checkpoint's upload with the time a notice leaves for it."""

    provider: str
    notice_s: float
    checkpoint_bytes: int
    throughput_bps: float
    measured: bool
    upload_s: float
    available_s: float
    advice: str = ""

    @property
    def fits(self) -> bool:
        return self.upload_s <= self.available_s

    def fields(self) -> dict[str, Any]:
        """The numbers, for an event."""
        return {
            "provider": self.provider,
            "notice_s": self.notice_s,
            "checkpoint_bytes": self.checkpoint_bytes,
            "throughput_mbps": round(self.throughput_bps / 1e6, 2),
            "throughput_measured": self.measured,
            "upload_s": round(self.upload_s, 1),
            "available_s": round(self.available_s, 1),
            "fits": self.fits,
            **({"advice": self.advice} if self.advice else {}),
        }

    def describe(self) -> str:
        """One line for ``check``."""
        speed = f"{self.throughput_bps / 1e6:.0f} MB/s" + (
            " measured" if self.measured else " (the default guess; nothing measured yet)"
        )
        head = (
            f"newest checkpoint {_size(self.checkpoint_bytes)} uploads in ~{self.upload_s:.0f} s"
            f" at {speed}; a {self.provider} notice leaves {self.available_s:.0f} s"
            f" ({self.notice_s:.0f} s less the safety margin)"
        )
        if self.fits:
            return f"{head}: fits"
        return f"{head}: does NOT fit. {self.advice}".rstrip()


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _nice_ceil(x: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 25, 50, 100, ... at least ``x``."""
    if x <= 1:
        return 1
    exp = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= x and float(m * exp).is_integer():
            return int(m * exp)
    return int(10 * exp)


def _nice_floor(x: float) -> int:
    """The largest of 1, 2, 5, 10, 20, 25, 50, 100, ... at most ``x`` (at least 1)."""
    if x < 2:
        return 1
    exp = 10 ** math.floor(math.log10(x))
    for m in (10, 5, 2.5, 2, 1):
        if m * exp <= x and float(m * exp).is_integer():
            return int(m * exp)
    return int(exp)


def advise(upload_s: float, cadence: Cadence) -> str:
    """How often to save so that an interruption loses little, when the emergency
    checkpoint cannot be committed in time."""
    target_s = max(2.0 * upload_s, MIN_ADVISED_INTERVAL_S)
    loss_s = target_s + upload_s
    per_step = cadence.seconds_per_step
    if per_step is None or not cadence.steps_between:
        return (
            f"An interruption loses the work since the newest periodic commit: save at"
            f" least every ~{target_s:.0f} s to bound it to ~{loss_s:.0f} s"
            " (or make the checkpoint smaller)."
        )
    current = cadence.steps_between
    current_s = cadence.seconds_between or current * per_step
    # The most steps between saves whose uploads keep up: at most target_s of training.
    steps = min(_nice_floor(max(target_s / per_step, 1.0)), current)
    if steps >= current:
        return (
            f"An interruption loses the work since the newest periodic commit (up to"
            f" ~{current_s + upload_s:.0f} s); saving every {current} steps is already as"
            " often as the uploads keep up with: make the checkpoint smaller or the upload"
            " faster to do better."
        )
    return (
        f"An interruption loses the work since the newest periodic commit: save every"
        f" {steps} steps instead of {current} (every ~{steps * per_step:.0f} s instead of"
        f" ~{current_s:.0f} s) to bound it to ~{steps * per_step + upload_s:.0f} s"
        f" instead of ~{current_s + upload_s:.0f} s."
    )


def notice_budget(
    provider: str,
    notice_s: float,
    checkpoint_bytes: int,
    throughput_bps: float | None,
    safety_margin: float,
    cadence: Cadence | None = None,
) -> Budget:
    """Whether a checkpoint of ``checkpoint_bytes`` uploads within a ``provider`` notice
    (``throughput_bps`` None: the default guess)."""
    measured = throughput_bps is not None and throughput_bps > 0
    bps = throughput_bps if measured and throughput_bps is not None else DEFAULT_THROUGHPUT_BPS
    upload_s = checkpoint_bytes / bps
    available_s = max(notice_s - safety_margin, 0.0)
    budget = Budget(provider, notice_s, checkpoint_bytes, bps, measured, upload_s, available_s)
    if budget.fits:
        return budget
    return Budget(
        provider,
        notice_s,
        checkpoint_bytes,
        bps,
        measured,
        upload_s,
        available_s,
        advise(upload_s, cadence or Cadence()),
    )


@dataclass(frozen=True)
class EmergencyDecision:
    """Whether to commit the emergency checkpoint in a drain, and the numbers why."""

    commit: bool
    budget: Budget
    why: str

    def fields(self) -> dict[str, Any]:
        return {"commit": self.commit, "why": self.why, **self.budget.fields()}


def emergency_decision(
    provider: str,
    notice_s: float,
    checkpoint_bytes: int,
    throughput_bps: float,
    measured: bool,
    seconds_left: float,
) -> EmergencyDecision:
    """In a drain: commit the emergency checkpoint only if its upload fits in
    ``seconds_left`` (until the cancel deadline). Only a *measured* speed can say no: the
    default guess is deliberately low, and a commit that does not finish is cancelled at
    the deadline anyway, leaving the newest periodic commit standing."""
    upload_s = checkpoint_bytes / throughput_bps if throughput_bps > 0 else math.inf
    budget = Budget(
        provider,
        notice_s,
        checkpoint_bytes,
        throughput_bps,
        measured,
        upload_s,
        max(seconds_left, 0.0),
    )
    if budget.fits:
        return EmergencyDecision(True, budget, "its upload fits before the deadline")
    if not measured:
        return EmergencyDecision(
            True, budget, "tried: no upload speed measured yet, the default guess may be low"
        )
    return EmergencyDecision(
        False,
        budget,
        "its upload cannot finish before the deadline at the measured speed: the newest"
        " periodic commit stands",
    )


def local_cadence(local_dir: Path) -> Cadence:
    """The trainer's cadence from its two newest complete local checkpoints."""
    manifests = []
    for _step, path in layout.list_step_dirs(local_dir):
        try:
            manifests.append(layout.read_manifest(path))
        except (layout.ManifestError, OSError):
            continue
        if len(manifests) == 2:
            break
    return cadence_of(manifests)


def cadence_of(manifests: Sequence[layout.Manifest]) -> Cadence:
    """The cadence from two manifests, newest first (their steps and ``created_at``)."""
    if len(manifests) < 2:
        return Cadence()
    newer, older = manifests[0], manifests[1]
    steps = newer.step - older.step
    t_new, t_old = _parse_time(newer.created_at), _parse_time(older.created_at)
    seconds = (t_new - t_old).total_seconds() if t_new and t_old else None
    return Cadence(steps if steps > 0 else None, seconds if seconds and seconds > 0 else None)


def _parse_time(value: object) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def log_startup_budget(budget: Budget) -> None:
    """The startup verdict: a warning with the numbers and the advice when it does not fit."""
    if budget.fits:
        log.info("checkpoint_fits_notice", **budget.fields())
    else:
        log.warning("checkpoint_exceeds_notice", **budget.fields())


def log_emergency_decision(decision: EmergencyDecision) -> None:
    """``emergency_commit_skipped`` (warning) when the drain will not commit, else an
    info line with the same numbers."""
    if decision.commit:
        log.info("emergency_commit_planned", **decision.fields())
    else:
        log.warning("emergency_commit_skipped", **decision.fields())


__all__ = [
    "MIN_ADVISED_INTERVAL_S",
    "Budget",
    "Cadence",
    "EmergencyDecision",
    "advise",
    "cadence_of",
    "emergency_decision",
    "local_cadence",
    "log_emergency_decision",
    "log_startup_budget",
    "notice_budget",
]
