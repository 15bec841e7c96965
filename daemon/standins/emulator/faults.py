"""Misbehaviours on demand: what the emulator can be told to do wrong, on which requests.

A :class:`Fault` makes matching requests answer 5xx/429, wait, hang up, carry a broken
body or a wrong ``ETag`` (GCP). The handler (:mod:`.server`) carries them out; the
emulator keeps them in the order added and counts them down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

FAULT_KINDS = ("status", "delay", "close", "malformed", "etag")
DEFAULT_MALFORMED_BODY = '{"action": "terminate", "time": "2026-11-28T09:0'


@dataclass
class Fault:
    """A misbehaviour for requests whose path starts with ``path_prefix``.

    ``kind``: ``status`` answers ``status`` with a short text body; ``delay`` answers
    normally after ``delay_s``; ``close`` hangs up without answering; ``malformed``
    answers 200 with ``body``; ``etag`` answers normally with a wrong ``ETag`` header.
    Any kind waits ``delay_s`` first. ``count`` is how many matching requests it still
    applies to (None: until cleared). ``method`` limits it to one HTTP method (None: any).
    """

    kind: str
    path_prefix: str = "/latest/"
    method: str | None = None
    count: int | None = None
    status: int = 503
    delay_s: float = 0.0
    body: str = DEFAULT_MALFORMED_BODY

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r} is not one of {', '.join(FAULT_KINDS)}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"fault count {self.count} must be at least 1 (or None)")
        if self.delay_s < 0:
            raise ValueError("fault delay_s must not be negative")
        if not 100 <= self.status <= 599:
            raise ValueError(f"fault status {self.status} is not an HTTP status")
        if self.method is not None:
            self.method = self.method.upper()

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault applies to a request."""
        return path.startswith(self.path_prefix) and self.method in (None, method)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as accepted by ``POST /_emulator/fault``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Fault:
        """Build a fault from the JSON body of ``POST /_emulator/fault``."""
        known = {"kind", "path_prefix", "method", "count", "status", "delay_s", "body"}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"unknown fault keys: {', '.join(sorted(unknown))}")
        if "kind" not in doc:
            raise ValueError("fault needs a kind")
        return cls(**dict(doc))
