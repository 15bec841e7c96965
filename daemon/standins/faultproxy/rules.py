"""The fault rules: what each kind does, what a rule matches, which rules fire on a request.

A rule matches a method and a regex searched in the request target (``/bucket/key?query``),
and fires for the next ``count`` matching requests (None: every one), each with
``probability`` drawn from the proxy's seeded RNG. Per request at most one rule of each
kind fires, the first in the order added; an ``error`` excludes every other kind
(:func:`choose`). Carrying the faults out is for :mod:`.body` and :mod:`.connection`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypedDict

from daemon.standins.faultproxy.shaping import TokenBucket


class FaultKind(str, Enum):
    """What a rule does to the requests it fires on."""

    ERROR = "error"
    RESET = "reset"
    THROTTLE = "throttle"
    STALL = "stall"
    CORRUPT = "corrupt"


class Phase(str, Enum):
    """Which body a ``reset``, ``corrupt`` or ``throttle`` rule acts on."""

    REQUEST = "request"
    RESPONSE = "response"
    BOTH = "both"  # throttle only


class RuleMatch(TypedDict, total=False):
    """Which requests a rule is about, and how often it fires (:class:`Rule`'s fields)."""

    method: str | None
    path: str | None
    count: int | None
    probability: float


@dataclass
class Rule:
    """One fault: what it matches, how often it fires, and what it does.

    ``method`` is compared case-insensitively (None: any); ``path`` is a regex searched in
    the request target, query included. ``count`` is the number of firings left (None:
    unlimited). Action parameters: ``status``/``code``/``message`` (error), ``phase``
    (reset, corrupt, throttle), ``after_bytes`` (reset and corrupt: the body offset;
    a reset always cuts the body short, even one no longer than that), ``nbytes``
    (corrupt: bytes flipped), ``rate`` (throttle: bytes per second), ``seconds`` (stall).
    ``applied`` counts firings.
    """

    kind: FaultKind
    method: str | None = None
    path: str | None = None
    count: int | None = None
    probability: float = 1.0
    status: int = 503
    code: str = "SlowDown"
    message: str | None = None
    phase: Phase = Phase.RESPONSE
    after_bytes: int = 0
    nbytes: int = 1
    rate: float = 0.0
    seconds: float = 0.0
    applied: int = 0
    id: int = 0
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _bucket: TokenBucket | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.kind = FaultKind(self.kind)
        self.phase = Phase(self.phase)
        if self.count is not None and self.count < 0:
            raise ValueError(f"count {self.count} must be >= 0 or None")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} must be within [0, 1]")
        if self.after_bytes < 0 or self.nbytes < 1:
            raise ValueError("after_bytes must be >= 0 and nbytes >= 1")
        if self.kind is FaultKind.THROTTLE:
            if self.rate <= 0:
                raise ValueError(f"throttle rate {self.rate} must be > 0 bytes/s")
            self._bucket = TokenBucket(self.rate)
        elif self.phase is Phase.BOTH:
            raise ValueError(f"phase 'both' is for throttle rules only, not {self.kind.value}")
        if self.kind is FaultKind.STALL and self.seconds <= 0:
            raise ValueError(f"stall seconds {self.seconds} must be > 0")
        if self.kind is FaultKind.ERROR and not 400 <= self.status <= 599:
            raise ValueError(f"error status {self.status} must be 4xx or 5xx")
        self._regex = re.compile(self.path) if self.path is not None else None

    def matches(self, method: str, target: str) -> bool:
        """Whether the request ``method target`` is one this rule is about."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self._regex is None or self._regex.search(target) is not None

    @property
    def exhausted(self) -> bool:
        """True once the rule has fired ``count`` times."""
        return self.count is not None and self.applied >= self.count

    @property
    def bucket(self) -> TokenBucket | None:
        """A throttle rule's token bucket, shared by every connection it matches."""
        return self._bucket

    def acts_on(self, phase: Phase) -> bool:
        """Whether the rule acts on the body of ``phase`` (request or response)."""
        return self.phase is phase or self.phase is Phase.BOTH

    def to_dict(self) -> dict[str, Any]:
        """The rule as JSON-ready values (for the HTTP control API)."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "method": self.method,
            "path": self.path,
            "count": self.count,
            "probability": self.probability,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "phase": self.phase.value,
            "after_bytes": self.after_bytes,
            "nbytes": self.nbytes,
            "rate": self.rate,
            "seconds": self.seconds,
            "applied": self.applied,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Rule:
        """A rule from :meth:`to_dict`'s keys (``kind`` required); ValueError on others."""
        allowed = {
            "kind",
            "method",
            "path",
            "count",
            "probability",
            "status",
            "code",
            "message",
            "phase",
            "after_bytes",
            "nbytes",
            "rate",
            "seconds",
        }
        unknown = set(doc) - allowed - {"id", "applied"}
        if unknown:
            raise ValueError(f"unknown rule keys: {', '.join(sorted(unknown))}")
        if "kind" not in doc:
            raise ValueError("a rule needs a 'kind'")
        try:
            return cls(**{k: v for k, v in doc.items() if k in allowed})
        except TypeError as exc:
            raise ValueError(str(exc)) from exc


@dataclass
class Chosen:
    """The rules firing on one request, at most one per kind."""

    error: Rule | None = None
    reset: Rule | None = None
    stall: Rule | None = None
    corrupt: Rule | None = None
    throttles: list[Rule] = field(default_factory=list)
    # The connection's shaped links, one per direction (None: not shaped).
    link_up: TokenBucket | None = None
    link_down: TokenBucket | None = None

    def names(self) -> tuple[str, ...]:
        kinds = [r.kind.value for r in (self.error, self.reset, self.stall, self.corrupt) if r]
        return tuple(kinds + [r.kind.value for r in self.throttles[:1]])

    def body_rules(self, phase: Phase) -> tuple[Rule | None, Rule | None, list[Rule]]:
        corrupt = self.corrupt if self.corrupt and self.corrupt.acts_on(phase) else None
        reset = self.reset if self.reset and self.reset.acts_on(phase) else None
        return corrupt, reset, [r for r in self.throttles if r.acts_on(phase)]


def choose(
    rules: list[Rule], rng: random.Random, method: str, target: str, fired: Counter[str]
) -> Chosen:
    """The rules that fire on ``method target``; each one's ``applied`` and ``fired[kind]``
    are counted. The caller holds the lock that guards ``rules`` and ``fired``."""
    chosen = Chosen()
    candidates = [r for r in rules if not r.exhausted and r.matches(method, target)]
    # Errors first: an error answers the request, so no other rule should spend a firing.
    candidates.sort(key=lambda r: r.kind is not FaultKind.ERROR)
    for rule in candidates:
        if chosen.error is not None:
            break  # errors sort first: the request is answered, nothing else applies
        single = rule.kind not in (FaultKind.ERROR, FaultKind.THROTTLE)
        if single and getattr(chosen, rule.kind.value) is not None:
            continue
        if rule.probability < 1.0 and rng.random() >= rule.probability:
            continue
        rule.applied += 1
        fired[rule.kind.value] += 1
        if rule.kind is FaultKind.THROTTLE:
            chosen.throttles.append(rule)
        else:
            setattr(chosen, rule.kind.value, rule)
    return chosen
