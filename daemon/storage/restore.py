"""Which checkpoint comes back onto the local disk, and how (the bytes are fetched by
daemon.storage.download).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import structlog

from daemon.layout import (
    Manifest,
    ManifestError,
    list_step_dirs,
    load_complete,
)
from daemon.storage.commit import (
    CommitLayer,
)
from daemon.storage.download import _Part, download_checkpoint
from daemon.storage.errors import IntegrityError, StoreError
from daemon.storage.global_commit import (
    CompleteSet,
    commit_set,
    is_node_part,
)
from daemon.storage.records import (
    RemoteCheckpoint,
    RestoreResult,
    _mbps,
)

log = structlog.get_logger(__name__)


class _LocalCheckpoints:
    """The complete checkpoints in ``local_dir``, validated (and hashed) only when asked."""

    def __init__(self, local_dir: Path) -> None:
        self._dirs = list_step_dirs(local_dir)
        self._checked: dict[int, Manifest | None] = {}

    def newest_at_least(self, min_step: int) -> tuple[int, Path, Manifest] | None:
        """The newest complete local checkpoint with step >= ``min_step``, or None."""
        for step, path in self._dirs:
            if step < min_step:
                return None
            if step not in self._checked:
                try:
                    self._checked[step] = load_complete(path)
                except (ManifestError, OSError) as exc:
                    log.warning(
                        "local_checkpoint_invalid", step=step, path=str(path), reason=str(exc)
                    )
                    self._checked[step] = None
            manifest = self._checked[step]
            # One node's part of a multi-node checkpoint is not a checkpoint to resume
            # from: the trainer needs every node's files (the global commit).
            if manifest is not None and not is_node_part(manifest):
                return step, path, manifest
        return None


class RestoreLayer(CommitLayer):
    """Which checkpoint comes back onto the local disk, and how (the bytes are fetched by
    daemon.storage.download).
    """

    def restore_newest(self, local_dir: Path) -> RestoreResult | None:
        """Make the newest verified checkpoint available in ``local_dir``.

        A complete local checkpoint at least as new as the newest remote one is kept and
        nothing is downloaded (``downloaded=False``). Otherwise the newest remote
        checkpoint is downloaded and verified; one that fails verification is skipped
        with a ``restore_skipped`` warning and the next older one is tried, down to any
        complete local one. So is one whose manifest is over ``MAX_MANIFEST_BYTES``, does
        not parse, or lists paths this filesystem cannot hold (``remote_checkpoint_ignored``
        or ``restore_skipped``): whatever is in the bucket, a boot goes on. None when
        there is no checkpoint anywhere. Storage failures other than bad bytes
        (unreachable, access denied) raise :class:`StoreError`: falling back to an older
        checkpoint for those would throw away progress.
        """
        t0 = time.monotonic()
        local = _LocalCheckpoints(local_dir)
        for remote in self._iter_committed(finish_parts=True):
            kept = local.newest_at_least(remote.step)
            if kept is not None:
                return self._keep_local(kept, t0, remote_step=remote.step)
            try:
                path = self._download(remote, local_dir)
            except IntegrityError as exc:
                log.warning(
                    "restore_skipped", step=remote.step, key=remote.manifest_key, reason=str(exc)
                )
                continue
            except OSError as exc:
                # The local side (read-only, full, gone): no older checkpoint would fare
                # better, so stop and say where.
                raise StoreError(
                    f"cannot restore step {remote.step} into {local_dir}: {exc.strerror or exc}",
                    "LocalIO",
                ) from exc
            if remote.pending_set is not None:
                self._finish_set(remote.pending_set)
            seconds = time.monotonic() - t0
            nbytes = remote.manifest.total_bytes
            result = RestoreResult(
                remote.step, path, nbytes, seconds, _mbps(nbytes, seconds), downloaded=True
            )
            log.info(
                "restore_completed",
                step=remote.step,
                bytes=nbytes,
                seconds=round(seconds, 3),
                mbps=round(result.mbps, 2),
                path=str(path),
            )
            return result
        kept = local.newest_at_least(0)
        if kept is not None:
            return self._keep_local(kept, t0, remote_step=None)
        log.info("restore_nothing", reason="no checkpoint, local or remote")
        return None

    def _download(self, remote: RemoteCheckpoint, local_dir: Path) -> Path:
        """Fetch and verify one remote checkpoint into ``local_dir``."""
        return download_checkpoint(
            self.client,
            self.location,
            remote.manifest,
            remote.manifest_raw,
            remote.objects,
            local_dir,
            part_size=self.transfer_config.multipart_chunksize,
            max_concurrency=self.transfer_config.max_request_concurrency,
            fetch=self._part_fetcher(),
        )

    def _part_fetcher(self) -> Callable[[_Part], str | None] | None:
        """How one part of a download is read: None, S3 GETs through the client (a store on
        another service reads through its own, see :mod:`daemon.storage.backend`)."""
        return None

    def _finish_set(self, found: CompleteSet) -> None:
        """Commit a set of parts whose bytes just verified on download."""
        try:
            commit_set(self, found)
        except StoreError as exc:
            # The restore stands (verified here); another node or boot commits it later.
            log.warning("global_commit_failed", step=found.step, error=str(exc))

    def _keep_local(
        self, kept: tuple[int, Path, Manifest], t0: float, remote_step: int | None
    ) -> RestoreResult:
        step, path, manifest = kept
        log.info("restore_local_kept", step=step, remote_step=remote_step, path=str(path))
        return RestoreResult(
            step, path, manifest.total_bytes, time.monotonic() - t0, 0.0, downloaded=False
        )
