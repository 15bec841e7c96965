"""Checkpoints in object storage: commit, list, restore, delete (CONTRACT §5).

Keys, under ``<prefix>/<run_id>/`` (the prefix may be empty)::

    checkpoints/step-<9 digits>/<path>           every file of the checkpoint
    checkpoints/step-<9 digits>/manifest.json    uploaded last: the manifest is the commit
    complete.json                                {"step": N, "completed_at": "..."}

A remote checkpoint exists exactly when its manifest exists and parses and every file
it lists is there with the listed size; restore then checks every sha256 while it
downloads. We never trust the server to have checked anything: moto and some
S3-compatible servers do not verify checksums. So before the manifest is written, every
object is checked to hold the local bytes (see :meth:`CheckpointStore.commit_manifest`):
by its ETag where that is the MD5 of the bytes, otherwise (SSE-KMS, or a server whose
ETags follow another convention) the way :class:`~daemon.storage.integrity.EndpointIntegrity`
decides for the endpoint. Bytes corrupted on the way up are sent again, or nothing is
committed.

The manifest object carries ``x-amz-meta-verified``: ``sha256`` when every file was
checked against the manifest's sha256 before the commit (or since, by
:meth:`CheckpointStore.mark_verified`), ``pending`` for an emergency commit whose staged
files were checked only against the server (ETag) and not yet hashed with sha256.
Retention counts only verified commits as the newer ones that make older ones redundant.

The class is composed of one layer per job, each a module of its own, each standing on
the one below: :mod:`~daemon.storage.objects` (keys, requests, small objects) <
:mod:`~daemon.storage.transfers` (uploads through s3transfer or CRT) <
:mod:`~daemon.storage.verify` (does the server hold our bytes) <
:mod:`~daemon.storage.listing` (what is committed; complete.json) <
:mod:`~daemon.storage.retention` (deletions and aborts) <
:mod:`~daemon.storage.commit` (files first, manifest last) <
:mod:`~daemon.storage.restore` (which checkpoint comes back).
"""

from __future__ import annotations

from daemon.storage.commit import copy_etag, refuse_unsafe_files
from daemon.storage.records import (
    CHECKPOINTS_DIR,
    COMPLETE_NAME,
    LEFTOVER_AGE_S,
    MAX_COMPLETE_BYTES,
    VERIFIED_META,
    RemoteCheckpoint,
    RestoreResult,
    StagedFile,
    UploadResult,
)
from daemon.storage.restore import RestoreLayer
from daemon.storage.retention import started_before


class CheckpointStore(RestoreLayer):
    """One run's checkpoints under ``<location>/<run_id>/`` in one bucket.

    Every storage failure comes out as :class:`StoreError` (a one-line message naming
    the bucket and key), integrity failures as its subclass :class:`IntegrityError`."""


__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE_NAME",
    "LEFTOVER_AGE_S",
    "MAX_COMPLETE_BYTES",
    "VERIFIED_META",
    "CheckpointStore",
    "RemoteCheckpoint",
    "RestoreResult",
    "StagedFile",
    "UploadResult",
    "copy_etag",
    "refuse_unsafe_files",
    "started_before",
]
