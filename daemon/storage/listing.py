"""What is committed: the listing, each step's manifest, and complete.json."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

from daemon.layout import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    ManifestError,
    parse_manifest,
    parse_step_dir,
    utc_now_iso,
)
from daemon.storage.errors import IntegrityError
from daemon.storage.global_commit import (
    PARTS_DIR,
    complete_sets,
)
from daemon.storage.locations import RemoteObject
from daemon.storage.records import (
    _SHA256_VERIFIED,
    MAX_COMPLETE_BYTES,
    VERIFIED_META,
    RemoteCheckpoint,
    _too_large,
)
from daemon.storage.verify import VerifyLayer

log = structlog.get_logger(__name__)


def _has_parts(objects: Mapping[str, RemoteObject]) -> bool:
    return any(path.startswith(PARTS_DIR + "/") for path in objects)


def _parse_complete(raw: bytes, url: str) -> dict[str, Any]:
    """The known fields of a ``complete.json``; IntegrityError saying what is wrong."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError included
        raise IntegrityError(f"{url} is not JSON: {exc}") from exc
    step = doc.get("step") if isinstance(doc, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise IntegrityError(f"{url} has no integer step")
    completed_at = doc.get("completed_at")
    return {"step": step, "completed_at": completed_at if isinstance(completed_at, str) else None}


class ListingLayer(VerifyLayer):
    """What is committed: the listing, each step's manifest, and complete.json."""

    def list_committed(self) -> list[RemoteCheckpoint]:
        """Every committed remote checkpoint, newest first (one paginated listing)."""
        return list(self._iter_committed())

    def newest_committed_step(self) -> int | None:
        """The step of the newest committed remote checkpoint, or None."""
        return next((c.step for c in self._iter_committed()), None)

    def _objects_by_step(self) -> dict[int, dict[str, RemoteObject]]:
        """Every object under ``checkpoints/``, by step and path within the step (one
        paginated listing; manifests and data alike, committed or not)."""
        by_step: dict[int, dict[str, RemoteObject]] = {}
        for obj in self._list(self._checkpoints_prefix):
            step_dir, _, path = obj.key[len(self._checkpoints_prefix) :].partition("/")
            step = parse_step_dir(step_dir)
            if step is not None and path:
                by_step.setdefault(step, {})[path] = obj
        return by_step

    def _iter_committed(self, *, finish_parts: bool = False) -> Iterator[RemoteCheckpoint]:
        # Lazy: restore usually needs only the newest manifest, not one GET per step.
        by_step = self._objects_by_step()
        for step in sorted(by_step, reverse=True):
            objects = by_step[step]
            ckpt = self._committed(step, objects)
            if ckpt is not None:
                yield ckpt
            elif finish_parts and MANIFEST_NAME not in objects and _has_parts(objects):
                # Every node's part is there but no manifest: the node that completed the
                # set died before writing it. A candidate: restore verifies, then commits.
                for found in complete_sets(self, step, objects):
                    raw = found.manifest.to_json()
                    key = self.file_key(step, MANIFEST_NAME)
                    yield RemoteCheckpoint(
                        step, found.manifest, key, raw, found.objects, False, pending_set=found
                    )

    def _committed(self, step: int, objects: dict[str, RemoteObject]) -> RemoteCheckpoint | None:
        """The checkpoint if ``objects`` (one step's listing) make a committed one."""
        manifest_obj = objects.get(MANIFEST_NAME)
        if manifest_obj is None:
            # Normal while an upload is in flight, or after one that died before its commit.
            log.info("remote_checkpoint_ignored", step=step, reason="no manifest")
            return None
        try:
            if manifest_obj.size > MAX_MANIFEST_BYTES:
                # Known from the listing: not even a GET.
                url = self.location.url(manifest_obj.key)
                raise IntegrityError(_too_large(url, manifest_obj.size, MAX_MANIFEST_BYTES))
            got = self._get_object(manifest_obj.key, missing_ok=True, max_bytes=MAX_MANIFEST_BYTES)
        except IntegrityError as exc:
            log.warning(
                "remote_checkpoint_ignored", step=step, key=manifest_obj.key, reason=str(exc)
            )
            return None
        if got is None:
            log.info("remote_checkpoint_ignored", step=step, reason="manifest vanished")
            return None
        raw, metadata = got
        try:
            manifest = parse_manifest(raw, expect_step=step)
        except ManifestError as exc:
            log.warning(
                "remote_checkpoint_ignored", step=step, key=manifest_obj.key, reason=str(exc)
            )
            return None
        files: dict[str, RemoteObject] = {}
        for entry in manifest.files:
            obj = objects.get(entry.path)
            if obj is None:
                log.warning(
                    "remote_checkpoint_ignored",
                    step=step,
                    key=self.file_key(step, entry.path),
                    reason="file missing",
                )
                return None
            if obj.size != entry.size:
                log.warning(
                    "remote_checkpoint_ignored",
                    step=step,
                    key=obj.key,
                    reason=f"{obj.size} bytes, manifest says {entry.size}",
                )
                return None
            files[entry.path] = obj
        # Manifests written before the field existed were all sha256-checked: verified.
        verified = metadata.get(VERIFIED_META, _SHA256_VERIFIED) == _SHA256_VERIFIED
        return RemoteCheckpoint(step, manifest, manifest_obj.key, raw, files, verified)

    def committed(self, step: int, objects: dict[str, RemoteObject]) -> RemoteCheckpoint | None:
        """The checkpoint if ``objects`` (one step's listing) make a committed one."""
        return self._committed(step, objects)

    def is_committed(self, step: int) -> bool:
        """Whether ``step`` has a manifest in storage (one listing of its prefix)."""
        return MANIFEST_NAME in self._step_objects(step)

    def read_complete(self) -> dict[str, Any] | None:
        """The run's ``complete.json`` (``step``, ``completed_at``), or None when the run
        is not complete.

        A ``complete.json`` that cannot be read (over :data:`MAX_COMPLETE_BYTES`, not
        JSON, no integer ``step``) is decided by what it stands for: the run is complete
        exactly when its newest committed checkpoint has reason ``final``. So a broken
        marker neither ends a run that is not finished nor stops every boot of one that
        is; a ``complete_marker_invalid`` warning names the key, what is wrong, and the
        decision. Only the known fields are returned: callers log them as keywords.
        """
        url = self.location.url(self.complete_key)
        try:
            raw = self._get_bytes(self.complete_key, missing_ok=True, max_bytes=MAX_COMPLETE_BYTES)
            return None if raw is None else _parse_complete(raw, url)
        except IntegrityError as exc:
            return self._complete_from_checkpoints(str(exc))

    def _complete_from_checkpoints(self, problem: str) -> dict[str, Any] | None:
        """Whether the run is complete, from its checkpoints, when complete.json is broken."""
        newest = next(self._iter_committed(), None)
        final = newest is not None and newest.manifest.reason == "final"
        log.warning(
            "complete_marker_invalid",
            key=self.complete_key,
            reason=problem,
            newest_committed_step=newest.step if newest is not None else None,
            newest_reason=newest.manifest.reason if newest is not None else None,
            decision="run complete: its newest committed checkpoint is final"
            if final
            else "run not complete: training goes on; delete or rewrite the marker",
        )
        if final and newest is not None:
            return {"step": newest.step, "completed_at": None}
        return None

    def write_complete(self, step: int) -> None:
        """Write ``complete.json``: the run finished, with checkpoint ``step`` committed."""
        body = json.dumps({"step": step, "completed_at": utc_now_iso()}).encode() + b"\n"
        self._put_bytes(self.complete_key, body, content_type="application/json")
        log.info("run_complete_written", step=step, key=self.complete_key)
