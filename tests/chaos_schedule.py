"""The chaos run's settings and its seeded fault schedule (tests/chaos_run.py; no tests).

What the run is (its run id, bucket and prefix), what ``--short`` and the full run
change (:class:`Settings`), the kinds of event and their weights, and the seeded, endless
stream of planned events. What must not live here: how an event is injected
(chaos_events.py) or checked (chaos_checker.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

RUN_ID = "chaos-run"
BUCKET = "chaos"
PREFIX = "runs"

KINDS = (
    "notice",
    "kill_trainer_mid_save",
    "kill_supervisor_mid_upload",
    "kill_supervisor_mid_commit",
    "rebalance",
    "s3_503_burst",
    "s3_500",
    "s3_reset",
    "s3_stall",
    "s3_corrupt",
)
WEIGHTS = {
    "notice": 16,
    "kill_trainer_mid_save": 14,
    "kill_supervisor_mid_upload": 11,
    "kill_supervisor_mid_commit": 11,
    "rebalance": 12,
    "s3_503_burst": 8,
    "s3_500": 6,
    "s3_reset": 8,
    "s3_stall": 7,
    "s3_corrupt": 7,
}


@dataclass(frozen=True)
class Settings:
    """What the run does; ``--short`` and the defaults differ only here."""

    events: int
    seed: int
    steps: int
    save_every: int
    step_seconds: float
    state_mb: int
    keep_remote: int = 3
    restore_check_every: int = 4
    gap: tuple[float, float] = (0.2, 1.5)
    max_seconds: float = 2400.0


# Steps enough that training outlasts the events (each lets it run for a second or two).
FULL = Settings(events=60, seed=7, steps=1500, save_every=10, step_seconds=0.1, state_mb=8)
SHORT = Settings(
    events=10,
    seed=11,
    steps=300,
    save_every=8,
    step_seconds=0.08,
    state_mb=2,
    restore_check_every=3,
    gap=(0.2, 0.8),
    max_seconds=600.0,
)


@dataclass(frozen=True)
class Planned:
    """One event of the seeded schedule: its kind, the pause before it, its parameters."""

    index: int
    kind: str
    gap_s: float
    params: dict[str, Any]


def schedule(seed: int) -> Iterator[Planned]:
    """The seeded, endless event stream: every kind once (shuffled), then weighted draws."""
    rng = random.Random(seed)
    first = list(KINDS)
    rng.shuffle(first)
    kinds = list(WEIGHTS)
    weights = [WEIGHTS[k] for k in kinds]
    i = 0
    while True:
        kind = first[i] if i < len(first) else rng.choices(kinds, weights)[0]
        params: dict[str, Any] = {}
        if kind == "notice":
            params = {"deadline_s": rng.randint(10, 120), "new_instance": rng.random() < 0.5}
        elif kind == "s3_503_burst":
            params = {"count": rng.randint(3, 8)}
        elif kind == "s3_500":
            params = {"count": rng.randint(2, 4)}
        elif kind == "s3_reset":
            params = {
                "phase": rng.choice(["request", "response"]),
                "after_bytes": rng.randint(0, 64 * 1024),
                "count": rng.randint(1, 2),
            }
        elif kind == "s3_stall":
            params = {"seconds": round(rng.uniform(1.0, 5.0), 2), "count": rng.randint(1, 2)}
        elif kind == "s3_corrupt":
            params = {"fraction": rng.random(), "nbytes": rng.randint(1, 16)}
        yield Planned(i, kind, rng.random(), params)
        i += 1
