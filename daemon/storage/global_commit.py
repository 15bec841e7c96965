"""One commit for a checkpoint written by several nodes (CONTRACT §7).

With ``run.nodes`` > 1 each node's trainer writes, on that node's disk, a complete
``step-<9 digits>/`` holding only the files on that node; its manifest names the global
ranks those files serve (``ranks``), the job's ``world_size`` and the ``incarnation``
(torchrun's rendezvous id) that wrote it. Such a manifest is a *part*.

In storage every node uploads its files under the usual keys, then its part manifest::

    <run>/checkpoints/step-<9 digits>/parts/<incarnation>/<node_id>.json

and then tries the commit: if the parts of its incarnation cover every rank, it merges
them into one manifest listing every file of every node and writes it as
``step-<9 digits>/manifest.json`` with ``If-None-Match: *``. Whichever node completes
the set writes it; no node is the leader. Two nodes finishing at once both see the set
complete and write byte-identical manifests (the merge is deterministic), so even a
store whose conditional writes are not atomic ends with one commit. Parts of two
incarnations that reached the same step are never merged: the key names the incarnation.
A commit whose writer died between the last part and the manifest is finished by the
next restore: it downloads the complete set, verifies every byte against the parts'
sha256, and only then writes the manifest (:func:`complete_sets`, :func:`commit_set`),
so a stale or hostile set that does not verify is never committed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from daemon.layout import MANIFEST_NAME, FileEntry, Manifest, ManifestError, parse_manifest
from daemon.storage.s3client import IntegrityError, StoreError

if TYPE_CHECKING:
    from daemon.storage.listing import ListingLayer as CheckpointStore
    from daemon.storage.records import RemoteCheckpoint

log = structlog.get_logger(__name__)

PARTS_DIR = "parts"
INCARNATION_KEY = "incarnation"
NO_INCARNATION = "none"
MAX_PART_BYTES = 64 * 1024 * 1024
# When parts disagree on the reason (they should not: the ranks agree on why they save),
# the commit takes the one that says most about the run's state.
_REASON_RANK = {"final": 3, "interrupt": 2, "periodic": 1, "requested": 0}
_SAFE_SEGMENT = re.compile(r"[^A-Za-z0-9._-]")


def is_node_part(manifest: Manifest) -> bool:
    """Whether a manifest holds one node's share of a multi-node checkpoint, not all of it."""
    world, ranks = manifest.extra.get("world_size"), manifest.extra.get("ranks")
    if not isinstance(world, int) or not isinstance(ranks, list) or world < 1:
        return False
    return set(ranks) != set(range(world))


def incarnation_of(manifest: Manifest) -> str:
    """The incarnation a part belongs to, as a safe key segment."""
    raw = manifest.extra.get(INCARNATION_KEY)
    text = raw if isinstance(raw, str) and raw else NO_INCARNATION
    return _SAFE_SEGMENT.sub("_", text)[:200]


def part_key(store: CheckpointStore, step: int, incarnation: str, node_id: str) -> str:
    """Where a node's part manifest goes."""
    return store.file_key(step, f"{PARTS_DIR}/{incarnation}/{node_id}.json")


def merge_parts(parts: list[Manifest], incarnation: str) -> Manifest | None:
    """One manifest for every file of every part, or None while a rank is missing.

    Deterministic (files sorted by path, the newest ``created_at``), so that two nodes
    completing the set at once write the same bytes. Raises :class:`IntegrityError` when
    parts disagree (world size, run, step, or one path with two contents).
    """
    if not parts:
        return None
    first = parts[0]
    worlds = {p.extra.get("world_size") for p in parts}
    if len(worlds) != 1 or {p.step for p in parts} != {first.step}:
        raise IntegrityError(
            f"parts of step {first.step} ({incarnation}) disagree on world size or step"
        )
    world = first.extra["world_size"]
    covered: set[int] = set()
    for p in parts:
        covered.update(r for r in p.extra.get("ranks", []) if isinstance(r, int))
    if covered != set(range(world)):
        return None
    files: dict[str, FileEntry] = {}
    for p in parts:
        for f in p.files:
            other = files.setdefault(f.path, f)
            if other != f:
                raise IntegrityError(
                    f"parts of step {first.step} ({incarnation}) hold two versions of {f.path}"
                )
    nodes = sorted(str(p.extra.get("node", "")) for p in parts)
    reason = max((p.reason for p in parts), key=lambda r: _REASON_RANK.get(r, -1))
    extra: dict[str, Any] = {
        "world_size": world,
        "ranks": list(range(world)),
        "nodes": nodes,
        INCARNATION_KEY: incarnation,
    }
    return Manifest(
        run_id=first.run_id,
        step=first.step,
        created_at=max(p.created_at for p in parts),
        reason=reason,
        files=tuple(files[k] for k in sorted(files)),
        extra=extra,
    )


def _parts_by_incarnation(listed: dict[str, Any]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in listed:
        head, _, rest = path.partition("/")
        inc, _, name = rest.partition("/")
        if head == PARTS_DIR and inc and name.endswith(".json") and "/" not in name:
            found.setdefault(inc, []).append(path)
    return found


@dataclass(frozen=True)
class CompleteSet:
    """The parts of one incarnation that cover every rank, merged, not yet committed."""

    step: int
    incarnation: str
    manifest: Manifest
    objects: dict[str, Any]
    verified: bool  # every part's own files passed its node's sha256
    parts: int


def complete_sets(
    store: CheckpointStore, step: int, listed: dict[str, Any], incarnation: str | None = None
) -> list[CompleteSet]:
    """Every incarnation (or only ``incarnation``) whose parts of ``step`` cover every rank
    and whose files are all listed with their sizes. Nothing is written."""
    by_inc = _parts_by_incarnation(listed)
    found = []
    for inc in [incarnation] if incarnation is not None else sorted(by_inc):
        parts, verified = _read_parts(store, step, listed, by_inc.get(inc, []))
        if not parts:
            continue
        try:
            merged = merge_parts(parts, inc)
        except IntegrityError as exc:
            log.warning("global_commit_refused", step=step, incarnation=inc, reason=str(exc))
            continue
        if merged is None:
            continue
        missing = [
            f.path for f in merged.files if getattr(listed.get(f.path), "size", -1) != f.size
        ]
        if missing:
            # A part is written after its node checked every one of its files on the
            # server: a file missing now was deleted or overwritten since. Not committable.
            log.warning("global_commit_refused", step=step, incarnation=inc, missing=missing[:5])
            continue
        objects = {f.path: listed[f.path] for f in merged.files}
        found.append(CompleteSet(step, inc, merged, objects, verified, len(parts)))
    return found


def try_global_commit(
    store: CheckpointStore, step: int, incarnation: str
) -> tuple[RemoteCheckpoint, bool] | None:
    """Commit ``step`` if the parts of ``incarnation`` cover every rank.

    A node names its own incarnation: its parts were checked on the server by their
    nodes before they were written, which is what makes writing the commit without
    reading the files back safe. (Restore, which knows no incarnation, verifies a set's
    bytes first and commits it afterwards: :func:`commit_set`.)

    ``(checkpoint, written)``: ``written`` is False when the commit existed already (or
    another node wrote it first). None while the set is incomplete. Storage failures
    raise :class:`StoreError`; a hostile or broken part is skipped with a warning.
    """
    listed = store.step_objects(step)
    if MANIFEST_NAME in listed:
        existing = store.committed(step, listed)
        return (existing, False) if existing is not None else None
    for found in complete_sets(store, step, listed, incarnation):
        return commit_set(store, found)
    return None


def _read_parts(
    store: CheckpointStore, step: int, listed: dict[str, Any], paths: list[str]
) -> tuple[list[Manifest], bool]:
    parts: list[Manifest] = []
    verified = True
    for path in sorted(paths):
        key = listed[path].key
        try:
            got = store.get_object(key, max_bytes=MAX_PART_BYTES)
            if got is None:
                continue
            raw, metadata = got
            parts.append(parse_manifest(raw, expect_step=step))
            verified = verified and store.metadata_says_verified(metadata)
        except (ManifestError, IntegrityError) as exc:
            log.warning("global_commit_part_ignored", step=step, key=key, reason=str(exc))
    return parts, verified


def commit_set(store: CheckpointStore, found: CompleteSet) -> tuple[RemoteCheckpoint, bool] | None:
    """Write the manifest of a complete set, unless someone was first (then theirs)."""
    from daemon.storage.records import RemoteCheckpoint  # store imports this module

    step, merged = found.step, found.manifest
    raw = merged.to_json()
    key = store.file_key(step, MANIFEST_NAME)
    try:
        store.put_manifest(key, raw, verified=found.verified, if_none_match=True)
    except StoreError as exc:
        if exc.code not in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise
        # Another node completed the set first: its commit is the one.
        existing = store.committed(step, store.step_objects(step))
        return (existing, False) if existing is not None else None
    log.info(
        "global_checkpoint_committed",
        step=step,
        incarnation=found.incarnation,
        parts=found.parts,
        nodes=merged.extra.get("nodes"),
        files=len(merged.files),
        bytes=merged.total_bytes,
        reason=merged.reason,
        verified=found.verified,
    )
    return RemoteCheckpoint(step, merged, key, raw, found.objects, found.verified), True
