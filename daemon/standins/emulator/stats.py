"""What the emulator has served: requests per method and path, answers per status,
tokens issued, connections accepted, faults applied, so a test can assert how many
requests a client made. Control requests are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from daemon.notices import imds


@dataclass
class EmulatorStats:
    """Counters since start (or the last reset). ``requests`` keys are ``"GET /path"``.

    Control requests (``/_emulator/...``) are not counted.
    """

    requests: dict[str, int] = field(default_factory=dict)
    responses: dict[str, int] = field(default_factory=dict)
    tokens_issued: int = 0
    connections: int = 0
    faults_applied: int = 0

    @property
    def total(self) -> int:
        """All counted requests."""
        return sum(self.requests.values())

    @property
    def token_puts(self) -> int:
        """Requests for a token, answered or not."""
        return self.count("PUT", imds.TOKEN_PATH)

    def count(self, method: str, path: str) -> int:
        """Requests seen for one method and path."""
        return self.requests.get(f"{method.upper()} {path}", 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as served by ``GET /_emulator/stats``."""
        doc = asdict(self)
        doc["total"] = self.total
        doc["token_puts"] = self.token_puts
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> EmulatorStats:
        """Parse the JSON of ``GET /_emulator/stats``."""
        return cls(
            requests=dict(doc["requests"]),
            responses=dict(doc["responses"]),
            tokens_issued=int(doc["tokens_issued"]),
            connections=int(doc["connections"]),
            faults_applied=int(doc["faults_applied"]),
        )
