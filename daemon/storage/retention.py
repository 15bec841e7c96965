"""What is deleted and what is aborted, and what never is (another node's or instance's work)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import structlog
from botocore.exceptions import ClientError

from daemon.layout import (
    MANIFEST_NAME,
)
from daemon.storage.errors import StoreError
from daemon.storage.listing import (
    ListingLayer,
)
from daemon.storage.locations import RemoteObject
from daemon.storage.records import (
    _DELETE_BATCH,
    LEFTOVER_AGE_S,
)

log = structlog.get_logger(__name__)


def started_before(upload: Mapping[str, Any], cutoff: float) -> bool:
    """Whether a listed multipart upload was initiated before ``cutoff`` (epoch seconds);
    an upload with no time is taken as young: never abort what may be in flight."""
    started = upload.get("Initiated")
    return started is not None and started.timestamp() < cutoff


def _untouched(objects: Iterable[RemoteObject], age: float = LEFTOVER_AGE_S) -> bool:
    """Whether no object was written in the last ``age`` seconds (unknown times: written)."""
    cutoff = time.time() - age
    return all(o.last_modified is not None and o.last_modified < cutoff for o in objects)


class RetentionLayer(ListingLayer):
    """What is deleted and what is aborted, and what never is (another node's or
    instance's work)."""

    def abort_incomplete_uploads(
        self,
        prefix: str | None = None,
        *,
        keys: Collection[str] | None = None,
        older_than: float | None = None,
    ) -> int:
        """Abort unfinished multipart uploads under ``prefix`` (default: the run's).

        At boot, those are leftovers of a machine that went away mid-upload; after a
        cancellation, those s3transfer could not abort itself. Either way they cost
        storage and are never part of a commit. But another instance of the run (a
        peer node, an early replacement) may be uploading right now, and nothing in a
        listing says whose an upload is: so a cancellation names its own ``keys``, and
        the boot-time sweep takes only uploads started over ``older_than`` seconds ago,
        far beyond any drain.
        """
        prefix = prefix if prefix is not None else self.location.key(self.run_id) + "/"
        aborted, why = self._abort_unfinished(prefix, keys, older_than)
        log.info(
            "multipart_uploads_aborted",
            prefix=prefix,
            aborted=aborted,
            **({"why": why} if why else {}),
            **({"older_than_s": older_than} if older_than is not None else {}),
        )
        return aborted

    def _abort_unfinished(
        self, prefix: str, keys: Collection[str] | None, older_than: float | None
    ) -> tuple[int, str | None]:
        """Abort the unfinished uploads under ``prefix`` that may be aborted (see
        :meth:`abort_incomplete_uploads`); how many, and why none could be (None here)."""
        bucket = self.location.bucket
        cutoff = None if older_than is None else time.time() - older_than

        def run() -> int:
            aborted = 0
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for up in page.get("Uploads", []):
                    key, upload_id = up.get("Key", ""), up.get("UploadId", "")
                    # Some servers ignore Prefix: filter here too.
                    if not key.startswith(prefix) or not upload_id:
                        continue
                    if keys is not None and key not in keys:
                        continue
                    if cutoff is not None and not started_before(up, cutoff):
                        continue
                    with contextlib.suppress(ClientError):  # finished or aborted meanwhile
                        self.client.abort_multipart_upload(
                            Bucket=bucket, Key=key, UploadId=upload_id
                        )
                        aborted += 1
            return aborted

        return self._call("abort", prefix, run), None

    def delete_checkpoint(self, step: int) -> None:
        """Delete one remote checkpoint: the manifest first (uncommit), then its files."""
        self._delete_key(self.file_key(step, MANIFEST_NAME))
        keys = [o.key for o in self._list(self.step_prefix(step))]
        if keys:
            self._delete_objects(self.step_prefix(step), keys)
        log.info("checkpoint_deleted", step=step, objects=len(keys))

    def _delete_objects(self, prefix: str, keys: list[str]) -> None:
        """Delete ``keys`` (under ``prefix``), in batches of DeleteObjects."""
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            resp = self._call(
                "delete",
                prefix,
                functools.partial(
                    self.client.delete_objects,
                    Bucket=self.location.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                ),
            )
            errors = resp.get("Errors", [])
            if errors:
                first = errors[0]
                raise StoreError(
                    f"delete {self.location.url(first.get('Key', ''))}: "
                    f"{first.get('Code', 'error')}: {first.get('Message', '')}".rstrip(": "),
                    first.get("Code"),
                )

    def apply_retention(self, keep: int) -> list[int]:
        """Keep the newest ``keep`` committed checkpoints; delete older ones. The deleted steps.

        Runs after a commit: a checkpoint is deleted only while ``keep`` newer ones are
        committed (manifest parses, every file listed with its size) and at least one of
        them is verified (every file checked against the manifest's sha256, not a
        ``pending`` emergency commit), and each deletion withdraws the manifest before
        the data. Leftovers without a
        manifest (a cancelled upload) older than the oldest kept checkpoint go too.
        """
        if keep < 1:
            raise ValueError(f"keep {keep} must be at least 1")
        by_step = self._objects_by_step()
        kept: list[int] = []
        doomed: list[int] = []
        newest_verified: int | None = None
        for step in sorted(by_step, reverse=True):
            if len(kept) < keep:
                ckpt = self._committed(step, by_step[step])
                if ckpt is not None:
                    kept.append(step)
                    if ckpt.verified and newest_verified is None:
                        newest_verified = step
                continue
            doomed.append(step)
        if len(kept) < keep or newest_verified is None:
            # Not enough newer ones, or none of them checked against its sha256 yet (an
            # emergency commit still pending): delete nothing.
            return []
        doomed = [s for s in doomed if s < kept[-1] and s < newest_verified]
        # An older step with no manifest is a leftover, or another node's (or another
        # instance's) upload in flight: only what nobody touched for an hour goes.
        doomed = [
            s for s in doomed if MANIFEST_NAME in by_step[s] or _untouched(by_step[s].values())
        ]
        for step in doomed:
            self.delete_checkpoint(step)
        if doomed:
            log.info("retention_applied", keep=keep, kept=kept, deleted=doomed)
        return doomed

    def check_writable(self) -> None:
        """Preflight: put and delete a small probe object under the run's prefix, and
        learn whether the server verifies checksums (:meth:`probe_checksum_verification`)."""
        key = self._probe_key()
        self._put_bytes(key, b"probe\n", content_type="text/plain")
        self._delete_key(key)
        log.info("store_writable", bucket=self.location.bucket, key=key)
        # Before any upload: whether the emergency tail may leave the ETag check to the
        # server's own checksum check.
        self.probe_checksum_verification()
