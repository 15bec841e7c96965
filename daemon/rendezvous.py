"""Rendezvous ids for torchrun across the restarts of a multi-node run (CONTRACT §7).

torchrun's c10d rendezvous is closed for good when an agent exits, so a restarted
agent cannot rejoin the id it had. Each *incarnation* of the run (every start of the
training command on every node, from one committed step) therefore needs an id that
all its nodes agree on without talking to each other, and that is never used again once
closed. The id is ``<run id>-s<step>-a<attempt>``:

* ``step``: the committed step the incarnation resumes from. Every node restores the
  newest global commit before it starts, so they agree on it.
* ``attempt``: one more than the highest attempt closed at that step. A supervisor whose
  trainer ended (crash, a peer's stop) records its id as closed in the bucket
  (``<run>/rendezvous/step-<9 digits>/closed-<attempt>``, an empty object) before it
  starts again. Survivors of one failure all close the same id and so all compute the
  same next one; a node booting later reads the same markers.

A crash loop from one committed step (every start dies before a new commit) thus moves
through ``-a0``, ``-a1``, ... and still rendezvouses each time. Two nodes can disagree
only if one closes an id the other has not yet left, and then the other's torchrun finds
its rendezvous closed, exits, closes it too, and both meet at the next attempt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import structlog

from daemon.layout import step_dir_name

if TYPE_CHECKING:
    from daemon.storage.store import CheckpointStore

log = structlog.get_logger(__name__)

RDZV_ENV = "PET_RDZV_ID"
RENDEZVOUS_DIR = "rendezvous"
_CLOSED_RE = re.compile(r"closed-(\d{1,9})$")
_ID_RE = re.compile(r"-s(\d+)-a(\d+)$")


def user_chose_rdzv_id(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """Whether the command or its environment already names the rendezvous id."""
    if env.get(RDZV_ENV):
        return True
    return any(
        a in ("--rdzv-id", "--rdzv_id") or a.startswith(("--rdzv-id=", "--rdzv_id=")) for a in argv
    )


def parse_id(rdzv_id: str) -> tuple[int, int] | None:
    """``(step, attempt)`` of an id we made; None for any other."""
    m = _ID_RE.search(rdzv_id)
    return (int(m.group(1)), int(m.group(2))) if m else None


class RendezvousIds:
    """Allocates and closes incarnation ids, with markers in the run's storage."""

    def __init__(self, store: CheckpointStore) -> None:
        self._store = store
        self._prefix = store.location.key(store.run_id, RENDEZVOUS_DIR) + "/"

    def _step_prefix(self, step: int) -> str:
        return f"{self._prefix}{step_dir_name(step)}/"

    def next_id(self, step: int | None) -> str:
        """The id of the next incarnation resuming from ``step`` (None: from scratch)."""
        s = step if step is not None else 0
        closed = [
            int(m.group(1))
            for obj in self._store.list_objects(self._step_prefix(s))
            if (m := _CLOSED_RE.search(obj.key)) is not None
        ]
        attempt = max(closed) + 1 if closed else 0
        return f"{self._store.run_id}-s{s}-a{attempt}"

    def close(self, rdzv_id: str) -> None:
        """Record that ``rdzv_id`` is closed (its torchrun exited): never use it again."""
        parsed = parse_id(rdzv_id)
        if parsed is None:
            return
        step, attempt = parsed
        key = f"{self._step_prefix(step)}closed-{attempt}"
        self._store.put_marker(key)
        log.info("rendezvous_closed", rdzv_id=rdzv_id, key=key)
