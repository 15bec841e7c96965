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
ETags follow another convention) the way :class:`~daemon.s3client.EndpointIntegrity`
decides for the endpoint. Bytes corrupted on the way up are sent again, or nothing is
committed.

The manifest object carries ``x-amz-meta-verified``: ``sha256`` when every file was
checked against the manifest's sha256 before the commit (or since, by
:meth:`CheckpointStore.mark_verified`), ``pending`` for an emergency commit whose staged
files were checked only against the server (ETag) and not yet hashed with sha256.
Retention counts only verified commits as the newer ones that make older ones redundant.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import CancelledError

from daemon.global_commit import (
    PARTS_DIR,
    CompleteSet,
    commit_set,
    complete_sets,
    incarnation_of,
    is_node_part,
    part_key,
    try_global_commit,
)
from daemon.layout import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    ManifestError,
    UnsafePathError,
    list_step_dirs,
    load_complete,
    open_listed,
    parse_manifest,
    parse_step_dir,
    step_dir_name,
    utc_now_iso,
)
from daemon.restore import download_checkpoint
from daemon.s3client import (
    BY_ETAG,
    BY_READ_BACK,
    BY_SERVER_CHECKSUM,
    DEFAULT_CHECKSUM_ALGORITHM,
    CancelSwitch,
    EndpointIntegrity,
    EtagDigest,
    IntegrityError,
    RemoteLocation,
    RemoteObject,
    RenameTolerantOSUtils,
    StoreError,
    UploadCancelled,
    describe_error,
    encryption_hiding_md5,
    endpoint_integrity,
    is_md5_etag,
    make_transfer_config,
    make_transfer_manager,
    multipart_part_size,
    normalize_etag,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

T = TypeVar("T")

COMPLETE_NAME = "complete.json"
# complete.json is a few dozen bytes; anything near this is not one (MAX_MANIFEST_BYTES,
# from daemon.layout, bounds each manifest read the same way).
MAX_COMPLETE_BYTES = 1024 * 1024
CHECKPOINTS_DIR = "checkpoints"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_HASH_CHUNK = 4 * 1024 * 1024
_DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes
# CopyObject takes objects up to 5 GiB; a larger unchanged file is simply uploaded again.
_MAX_COPY_BYTES = 5 * 1024**3
VERIFIED_META = "verified"  # x-amz-meta-verified on the manifest object
_SHA256_VERIFIED = "sha256"
_PENDING = "pending"


@dataclass(frozen=True)
class StagedFile:
    """A file the emergency pipeline uploaded before the commit began.

    ``etag`` is the ETag its bytes must have on the server (None: unknown, the check
    is skipped and says so); ``sha256_checked`` whether our own sha256 of the bytes
    sent equals the manifest's (if not, the commit is ``pending`` until
    :meth:`CheckpointStore.mark_verified`).
    """

    size: int
    etag: str | None
    sha256_checked: bool


@dataclass
class _ListingCheck:
    """The objects of a manifest's files after upload, and how their bytes were checked."""

    objects: dict[str, RemoteObject] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)  # the server holds other bytes
    how: dict[str, str] = field(default_factory=dict)  # path -> BY_ETAG, BY_READ_BACK, ...
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why not checked

    def by(self, method: str) -> list[str]:
        return sorted(p for p, how in self.how.items() if how == method)


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A committed remote checkpoint: its manifest and the object listed for each file."""

    step: int
    manifest: Manifest
    manifest_key: str
    manifest_raw: bytes = field(repr=False)
    objects: dict[str, RemoteObject] = field(repr=False)
    # Every file checked against the manifest's sha256 (before the commit, or since).
    verified: bool = True
    # Restore only: a complete set of node parts with no manifest yet (its last finisher
    # died). Committed once its bytes verified on download.
    pending_set: CompleteSet | None = field(default=None, repr=False, compare=False)

    @property
    def keys(self) -> dict[str, str]:
        """Object key of each file, by its path in the manifest."""
        return {path: obj.key for path, obj in self.objects.items()}


@dataclass(frozen=True)
class UploadResult:
    """One commit: ``mbps`` is megabytes (10^6 bytes) per second over the whole commit.

    ``already_committed`` is True when the step was already remote and nothing was sent.
    ``bytes`` is the checkpoint's size; of it, ``bytes_sent`` went over the wire in the
    commit, ``bytes_copied`` was copied server-side from the previous checkpoint, and
    ``bytes_staged`` had been uploaded before the commit began (emergency pipeline).
    """

    step: int
    bytes: int
    seconds: float
    mbps: float
    already_committed: bool = False
    bytes_sent: int = 0
    bytes_copied: int = 0
    bytes_staged: int = 0
    remote: RemoteCheckpoint | None = field(default=None, repr=False)
    # Files committed without our sha256 check (staged, checked by ETag only).
    unverified: tuple[str, ...] = ()
    # A node's part of a multi-node checkpoint went up, but the set is not complete yet
    # (``remote`` is None until the global commit): the incarnation it belongs to.
    part_of: str | None = None


@dataclass(frozen=True)
class RestoreResult:
    """The checkpoint a restore left in place: downloaded, or a newer local one kept."""

    step: int
    path: Path
    bytes: int
    seconds: float
    mbps: float
    downloaded: bool


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else 0.0


class CheckpointStore:
    """One run's checkpoints under ``<location>/<run_id>/`` in one bucket.

    Every storage failure comes out as :class:`StoreError` (a one-line message naming
    the bucket and key), integrity failures as its subclass :class:`IntegrityError`.
    """

    def __init__(
        self,
        client: S3Client,
        location: RemoteLocation,
        run_id: str,
        transfer_config: TransferConfig | None = None,
        *,
        checksum_algorithm: str | None = DEFAULT_CHECKSUM_ALGORITHM,
        crt: bool = False,
    ) -> None:
        """``checksum_algorithm`` (``CRC32``, ``SHA256``, ``CRC32C``; see
        :func:`daemon.s3client.checksum_algorithm`) asks the server to verify each
        upload on arrival too (None for S3-compatible servers that reject
        ``x-amz-checksum-*`` headers; build the client with ``request_checksums=False``
        then). ``crt`` uploads through the CRT client (see
        :func:`daemon.s3client.use_crt`)."""
        if not _RUN_ID_RE.match(run_id):
            raise ValueError(f"run id {run_id!r} does not match [A-Za-z0-9._-]{{1,128}}")
        self.client = client
        self.location = location
        self.run_id = run_id
        self.transfer_config = transfer_config or make_transfer_config()
        self._checksum_algorithm = checksum_algorithm
        self._checkpoints_prefix = location.key(run_id, CHECKPOINTS_DIR) + "/"
        self._crt = crt
        # Set for a multi-node run (run.nodes > 1): this node's name in part keys.
        self.node_id: str | None = None
        self._switch = CancelSwitch()
        self._switch.install(client)
        self._resolvers: list[Callable[[str], str]] = []
        self._osutil = RenameTolerantOSUtils(self._resolve_path)
        self._watching: dict[int, str] = {}  # id(transfer future) -> watched filename
        self._tms: dict[bool, Any] = {}  # crt? -> transfer manager
        self._tm_lock = threading.Lock()

    # -- keys -------------------------------------------------------------------------

    def step_prefix(self, step: int) -> str:
        """``<prefix>/<run_id>/checkpoints/step-<9 digits>/``."""
        return self._checkpoints_prefix + step_dir_name(step) + "/"

    def file_key(self, step: int, path: str) -> str:
        """The key of one file (or of ``manifest.json``) of a checkpoint."""
        return self.step_prefix(step) + path

    @property
    def complete_key(self) -> str:
        """``<prefix>/<run_id>/complete.json``."""
        return self.location.key(self.run_id, COMPLETE_NAME)

    # -- listing ----------------------------------------------------------------------

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

    # -- upload -----------------------------------------------------------------------

    @property
    def cancel_switch(self) -> CancelSwitch:
        """Thrown once, at the notice deadline less the margin: every upload stops."""
        return self._switch

    def add_path_resolver(self, resolve: Callable[[str], str]) -> None:
        """Let uploads find a file whose directory was renamed while it was being sent."""
        self._resolvers.append(resolve)

    def _resolve_path(self, path: str) -> str:
        for resolve in self._resolvers:
            moved = resolve(path)
            if moved != path:
                return moved
        return path

    @property
    def transfer_manager(self) -> Any:
        """The transfer manager of complete files (its concurrency is shared by their uploads)."""
        return self._manager(self._crt)

    def _manager(self, crt: bool) -> Any:
        with self._tm_lock:
            tm = self._tms.get(crt)
            if tm is None:
                tm = self._tms[crt] = make_transfer_manager(
                    self.client, self.transfer_config, crt=crt, osutil=self._osutil
                )
            return tm

    def _uses_crt(self, staged: bool) -> bool:
        """Whether an upload goes through the CRT client.

        Never for a staged file: it lives in a writer's ``.tmp-`` directory, which is
        renamed into place while the file is being sent. The classic manager reopens it
        under its new name (:class:`RenameTolerantOSUtils`); the CRT client reads the
        path natively, part by part, and would fail in the middle of the upload.
        """
        return self._crt and not staged

    def close(self) -> None:
        """Shut the transfer managers down (waiting for what is in flight)."""
        with self._tm_lock:
            tms, self._tms = list(self._tms.values()), {}
        for tm in tms:
            tm.shutdown(cancel=self._switch.cancelled)

    def upload_args(self, sha256: str | None) -> dict[str, Any]:
        """Extra arguments of every file upload: our sha256 (when known before it is
        sent), and the server-side checksum."""
        extra: dict[str, Any] = {"Metadata": {"sha256": sha256}} if sha256 else {}
        if self._checksum_algorithm:
            extra["ChecksumAlgorithm"] = self._checksum_algorithm
        return extra

    def etag_digest(self, size: int) -> EtagDigest:
        """A digest of the ETag a file of ``size`` bytes gets from this store's uploads."""
        return EtagDigest(size, multipart_part_size(self.transfer_config, size))

    def etag_checkable(self, size: int, *, staged: bool = False) -> bool:
        """Whether we know the part boundaries of an upload of ``size`` bytes.

        The classic transfer manager's we know (s3transfer's own rule); the CRT client
        splits files its own way, so its multipart ETags are not checked (AWS S3, the
        only endpoint it is used with, verifies the additional checksum itself).
        ``staged``: a file of a checkpoint still being written (see :meth:`_uses_crt`).
        """
        return not self._uses_crt(staged) or multipart_part_size(self.transfer_config, size) is None

    def start_upload(
        self,
        path: Path,
        key: str,
        sha256: str | None,
        digest: EtagDigest | None = None,
        *,
        staged: bool = False,
    ) -> Any:
        """Submit one file to the transfer manager; its future, cancelled with the switch.

        ``digest`` (classic transfer manager only) is fed with the bytes as they are read
        to be sent: its :meth:`~daemon.s3client.EtagDigest.etag` is then the ETag the
        object must have, at no extra read. ``staged``: a file of a checkpoint still
        being written, always sent by the classic manager (see :meth:`_uses_crt`).
        """
        self._switch.check(f"upload {self.location.url(key)}")
        crt = self._uses_crt(staged)
        watch = digest is not None and not crt
        if watch and digest is not None:
            self._osutil.watch(str(path), digest)
        try:
            future = self._manager(crt).upload(
                str(path), self.location.bucket, key, extra_args=self.upload_args(sha256)
            )
        except BaseException:
            if watch:
                self._osutil.unwatch(str(path))
            raise
        if watch:
            with self._tm_lock:
                self._watching[id(future)] = str(path)
        self._switch.track(future)
        return future

    def _release(self, future: Any) -> None:
        self._switch.untrack(future)
        with self._tm_lock:
            path = self._watching.pop(id(future), None)
        if path is not None:
            self._osutil.unwatch(path)

    def wait_upload(self, future: Any, key: str) -> None:
        """Wait for one submitted upload; its failure as :class:`StoreError`."""
        try:
            future.result()
        except FileNotFoundError:
            raise
        except (ClientError, BotoCoreError, OSError, CancelledError, UploadCancelled) as exc:
            raise describe_error(exc, action="upload", location=self.location, key=key) from exc
        finally:
            self._release(future)

    def upload_checkpoint(
        self,
        ckpt_dir: Path,
        manifest: Manifest,
        *,
        previous: RemoteCheckpoint | None = None,
        staged: Mapping[str, StagedFile] | None = None,
    ) -> UploadResult:
        """Commit a complete local checkpoint: every file, then the manifest last.

        Each file is hashed right before it is sent and must match the manifest, and
        must not change while it is sent; otherwise nothing is committed
        (:class:`IntegrityError`). A file whose size and sha256 equal those of a file of
        ``previous`` (the newest committed checkpoint) is copied server-side instead of
        sent. ``staged`` names files already uploaded (by the emergency pipeline): they
        are not sent again. Before the manifest is written every object's ETag is
        compared with the local bytes' MD5 (:meth:`commit_manifest`); a mismatch is sent
        again once, then :class:`IntegrityError`. Staged files not checked against the
        manifest's sha256 make the commit ``pending`` (``unverified`` in the result) until
        :meth:`mark_verified`. A step already committed
        remotely is left alone (``already_committed``). Any failure leaves no manifest
        behind; a cancellation (:class:`UploadCancelled`) also aborts this step's
        unfinished multipart uploads. Raises :class:`StoreError`, or
        ``FileNotFoundError`` when the local checkpoint vanished (pruned) meanwhile.
        """
        t0 = time.monotonic()
        step = manifest.step
        self._switch.check(f"commit step {step}")
        manifest_raw = self._manifest_bytes(ckpt_dir, manifest)
        refuse_unsafe_files(ckpt_dir, manifest)
        manifest_key = self.file_key(step, MANIFEST_NAME)
        existing = self._step_objects(step)
        if MANIFEST_NAME in existing:
            committed = self._committed(step, existing)
            if committed is not None:
                if committed.manifest.files != manifest.files:
                    # Both are valid states of the run; the one committed first stays.
                    log.warning("checkpoint_conflict", step=step, key=committed.manifest_key)
                log.info("checkpoint_already_committed", step=step)
                return UploadResult(step, 0, 0.0, 0.0, already_committed=True, remote=committed)
            # A manifest whose files are broken: withdraw the commit before replacing them,
            # so nobody restores a half-replaced checkpoint meanwhile.
            self._call(
                "delete",
                manifest_key,
                lambda: self.client.delete_object(Bucket=self.location.bucket, Key=manifest_key),
            )
        staged = dict(staged or {})
        entries = {e.path: e for e in manifest.files}
        try:
            copied = self._copy_unchanged(manifest, previous, exclude=set(staged))
            to_send = [e for e in manifest.files if e.path not in staged and e.path not in copied]
            expected: dict[str, str | None] = {p: f.etag for p, f in staged.items()}
            expected.update(copied)
            expected.update(self._upload_files(ckpt_dir, step, to_send))
            unverified = {p for p, f in staged.items() if not f.sha256_checked and p in entries}

            def resend(path: str) -> str | None:
                etag = self._upload_files(ckpt_dir, step, [entries[path]])[path]
                unverified.discard(path)  # hashed with sha256 on the way
                return etag

            sent = sum(e.size for e in to_send)
            bytes_copied = sum(e.size for e in manifest.files if e.path in copied)
            bytes_staged = sum(e.size for e in manifest.files if e.path in staged)
            uploaded = time.monotonic()
            log.info(
                "checkpoint_uploaded",
                step=step,
                files=len(manifest.files),
                bytes=manifest.total_bytes,
                bytes_sent=sent,
                bytes_copied=bytes_copied,
                bytes_staged=bytes_staged,
                seconds=round(uploaded - t0, 3),
            )
            committed = self.commit_manifest(
                step, manifest, manifest_raw, expected, resend=resend, pending=unverified
            )
        except UploadCancelled:
            # Only this node's files: another node may be uploading the same step.
            self.abort_incomplete_uploads(
                self.step_prefix(step), keys={self.file_key(step, e.path) for e in manifest.files}
            )
            raise
        remote: RemoteCheckpoint | None = committed
        part_of: str | None = None
        if self.node_id is not None and is_node_part(manifest):
            part_of = incarnation_of(manifest)
            done = try_global_commit(self, step, part_of)
            remote = done[0] if done is not None else None
        seconds = time.monotonic() - t0
        result = UploadResult(
            step,
            manifest.total_bytes,
            seconds,
            _mbps(manifest.total_bytes, seconds),
            bytes_sent=sent,
            bytes_copied=bytes_copied,
            bytes_staged=bytes_staged,
            remote=remote,
            unverified=tuple(sorted(unverified)),
            part_of=part_of if remote is None else None,
        )
        log.info(
            "checkpoint_part_uploaded" if result.part_of else "checkpoint_committed",
            step=step,
            bytes=result.bytes,
            bytes_sent=sent,
            bytes_copied=bytes_copied,
            bytes_staged=bytes_staged,
            seconds=round(seconds, 3),
            mbps=round(result.mbps, 2),
            verified=remote.verified if remote is not None else False,
            **({"incarnation": part_of, "node_id": self.node_id} if part_of else {}),
        )
        return result

    def commit_manifest(
        self,
        step: int,
        manifest: Manifest,
        manifest_raw: bytes,
        expected: Mapping[str, str | None] | None = None,
        *,
        resend: Callable[[str], str | None] | None = None,
        pending: set[str] | None = None,
    ) -> RemoteCheckpoint:
        """Write the manifest (the commit) once the server holds the bytes we sent.

        The listing must show every file with its size, and each file must hold the
        local bytes: its ETag is the one ``expected`` gives (the MD5 of the local bytes,
        or for multipart the MD5 of the parts' MD5s and ``-N``), or, where the ETag is
        not that (SSE-KMS, DSSE-KMS, SSE-C; a server with its own ETags), the object is
        verified as :class:`~daemon.s3client.EndpointIntegrity` decides: AWS's checksum
        check, or read back and hashed against the manifest's sha256. A file holding
        other bytes is sent again once with ``resend`` (which returns its new expected
        ETag), then :class:`IntegrityError`. Files without an expected ETag are not
        checked. ``checkpoint_etags_checked`` says how each file was. ``pending`` (files
        not yet checked against the manifest's sha256; those read back or sent again
        are) makes the commit ``pending`` instead of ``sha256``-verified.
        """
        expected = dict(expected or {})
        pending = pending if pending is not None else set()
        check = self._check_listing(step, manifest, self._step_objects(step), expected)
        if check.bad and resend is not None:
            for path in check.bad:
                log.warning(
                    "uploaded_bytes_differ",
                    step=step,
                    path=path,
                    expected_etag=expected.get(path),
                    etag=normalize_etag(check.objects[path].etag),
                    action="sending again",
                )
                self._switch.check(f"commit step {step}")
                expected[path] = resend(path)
            check = self._check_listing(step, manifest, self._step_objects(step), expected)
        if check.bad:
            path = check.bad[0]
            url = self.location.url(self.file_key(step, path))
            raise IntegrityError(
                f"commit {url}: the server holds other bytes than the local file (ETag"
                f" {normalize_etag(check.objects[path].etag)}, local {expected.get(path)};"
                " read back, its sha256 is not the manifest's); manifest not written"
            )
        # Read back and hashed just now: checked against the manifest's sha256.
        pending.difference_update(check.by(BY_READ_BACK))
        log.info(
            "checkpoint_etags_checked",
            step=step,
            checked=len(check.by(BY_ETAG)),
            read_back=check.by(BY_READ_BACK),
            server_checksum=check.by(BY_SERVER_CHECKSUM),
            unchecked=check.skipped,
        )
        verified = not pending
        manifest_key = self.file_key(step, MANIFEST_NAME)
        if self.node_id is not None and is_node_part(manifest):
            # One node's share: its part manifest, never the step's commit.
            manifest_key = part_key(self, step, incarnation_of(manifest), self.node_id)
        self._switch.check(f"commit {self.location.url(manifest_key)}")
        self._put_bytes(
            manifest_key,
            manifest_raw,
            content_type="application/json",
            metadata={VERIFIED_META: _SHA256_VERIFIED if verified else _PENDING},
        )
        return RemoteCheckpoint(step, manifest, manifest_key, manifest_raw, check.objects, verified)

    def _check_listing(
        self,
        step: int,
        manifest: Manifest,
        listed: Mapping[str, RemoteObject],
        expected: Mapping[str, str | None],
    ) -> _ListingCheck:
        """Every file of ``manifest`` listed with its size, and whether it holds the
        local bytes (see :meth:`_verify_stored`)."""
        check = _ListingCheck()
        for entry in manifest.files:
            obj = listed.get(entry.path)
            if obj is None or obj.size != entry.size:
                raise IntegrityError(
                    f"commit {self.location.url(self.file_key(step, entry.path))}: "
                    f"not listed with {entry.size} bytes after upload; manifest not written"
                )
            check.objects[entry.path] = obj
            want = expected.get(entry.path)
            if want is None:
                check.skipped[entry.path] = "no expected ETag (part boundaries or source unknown)"
                continue
            if normalize_etag(obj.etag) == normalize_etag(want):
                check.how[entry.path] = BY_ETAG  # the common case: no request
                continue
            # A listing says nothing of encryption: the object's own fields do.
            how = self._verify_stored(obj.key, self._head(obj.key), want, entry.sha256)
            if how is None:
                check.bad.append(entry.path)
            else:
                check.how[entry.path] = how
        return check

    @property
    def _integrity(self) -> EndpointIntegrity:
        return endpoint_integrity(str(self.client.meta.endpoint_url))

    def _verify_stored(
        self, key: str, fields: Mapping[str, Any], md5_etag: str, sha256: str
    ) -> str | None:
        """How the object ``key`` was found to hold the local bytes (``BY_ETAG``,
        ``BY_SERVER_CHECKSUM``, ``BY_READ_BACK``); None when it holds other bytes.

        ``fields`` are the object's response fields (PutObject, HeadObject); ``md5_etag``
        the ETag AWS gives the local bytes, ``sha256`` their hash. An ETag that is not
        ``md5_etag`` is a corruption only if the bytes read back say so: otherwise the
        encryption or the endpoint's ETag convention explains it.
        """
        etag = normalize_etag(str(fields.get("ETag") or ""))
        if etag == normalize_etag(md5_etag):
            return BY_ETAG
        multipart = "-" in md5_etag
        how = self._integrity.method(fields, multipart=multipart)
        if how == BY_SERVER_CHECKSUM:
            return how
        if self._read_back_sha256(key) != sha256:
            return None
        if encryption_hiding_md5(fields) is None:
            # Unencrypted, the right bytes, not their MD5: the endpoint's own ETags.
            self._integrity.etag_convention_differs(
                multipart=multipart, key=key, etag=etag, expected=md5_etag
            )
        return BY_READ_BACK

    def _head(self, key: str) -> dict[str, Any]:
        """The object's response fields: encryption, ETag and its additional checksum."""
        resp = self._call(
            "head",
            key,
            lambda: self.client.head_object(
                Bucket=self.location.bucket, Key=key, ChecksumMode="ENABLED"
            ),
        )
        return dict(resp)

    def _read_back_sha256(self, key: str) -> str:
        """The sha256 of the object's bytes as the server returns them (one streamed GET;
        stopped by the cancel switch, since no manifest may follow it then)."""
        what = f"verify {self.location.url(key)}"

        def run() -> str:
            resp = self.client.get_object(Bucket=self.location.bucket, Key=key)
            h = hashlib.sha256()
            body = resp["Body"]
            try:
                for chunk in body.iter_chunks(_HASH_CHUNK):
                    self._switch.check(what)
                    h.update(chunk)
            finally:
                body.close()
            return h.hexdigest()

        return self._call("verify", key, run)

    def mark_verified(self, remote: RemoteCheckpoint) -> RemoteCheckpoint:
        """Record that every file of a ``pending`` commit now checked out against the
        manifest's sha256: the same manifest bytes are written again, ``verified``."""
        if remote.verified:
            return remote
        self._switch.check(f"verify {self.location.url(remote.manifest_key)}")
        self._put_bytes(
            remote.manifest_key,
            remote.manifest_raw,
            content_type="application/json",
            metadata={VERIFIED_META: _SHA256_VERIFIED},
        )
        log.info("checkpoint_verified", step=remote.step, key=remote.manifest_key)
        return RemoteCheckpoint(
            remote.step,
            remote.manifest,
            remote.manifest_key,
            remote.manifest_raw,
            remote.objects,
            verified=True,
        )

    def _manifest_bytes(self, ckpt_dir: Path, manifest: Manifest) -> bytes:
        # The exact local bytes when there are some, so remote and local manifests are equal.
        if not ckpt_dir.is_dir():
            raise FileNotFoundError(errno.ENOENT, "checkpoint directory is gone", str(ckpt_dir))
        try:
            raw = (ckpt_dir / MANIFEST_NAME).read_bytes()
        except FileNotFoundError:
            return manifest.to_json()
        if parse_manifest(raw) != manifest:
            raise IntegrityError(f"{ckpt_dir / MANIFEST_NAME} differs from the manifest to commit")
        return raw

    def _copy_unchanged(
        self, manifest: Manifest, previous: RemoteCheckpoint | None, exclude: set[str]
    ) -> dict[str, str | None]:
        """Copy server-side every file equal (size, sha256) to one of ``previous``.

        The copied paths, each with the ETag its copy must have: the source's, when that
        is a single-part MD5 (a copy of a multipart source gets a new, whole-object MD5,
        which only a read of the bytes could tell: None, not checked).
        """
        if previous is None or previous.step == manifest.step:
            return {}
        sources = {
            (e.sha256, e.size): previous.objects[e.path]
            for e in previous.manifest.files
            if e.path in previous.objects
        }
        jobs = [
            (e, sources[(e.sha256, e.size)])
            for e in manifest.files
            if e.path not in exclude
            and e.size > 0
            and e.size <= _MAX_COPY_BYTES
            and (e.sha256, e.size) in sources
        ]
        if not jobs:
            return {}
        copied: dict[str, str | None] = {}
        workers = max(1, min(len(jobs), self.transfer_config.max_request_concurrency))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="copy") as pool:
            futures = {
                pool.submit(self.copy_file, src, self.file_key(manifest.step, e.path), e): (e, src)
                for e, src in jobs
            }
            for fut in as_completed(futures):
                if fut.result():
                    entry, src = futures[fut]
                    copied[entry.path] = copy_etag(src)
        return copied

    def copy_file(self, src: RemoteObject, key: str, entry: FileEntry) -> bool:
        """CopyObject one unchanged file; False (upload it instead) when the source is gone."""
        self._switch.check(f"copy {self.location.url(key)}")
        extra: dict[str, Any] = {}
        if self._checksum_algorithm:
            extra["ChecksumAlgorithm"] = self._checksum_algorithm
        try:
            self.client.copy_object(
                Bucket=self.location.bucket,
                Key=key,
                CopySource={"Bucket": self.location.bucket, "Key": src.key},
                CopySourceIfMatch=src.etag,
                MetadataDirective="COPY",
                **extra,
            )
        except (ClientError, BotoCoreError) as exc:
            err = describe_error(exc, action="copy", location=self.location, key=key)
            if err.code in ("NoSuchKey", "PreconditionFailed"):
                log.info("copy_source_gone", key=key, source=src.key, code=err.code)
                return False
            raise err from exc
        log.info("file_copied", key=key, source=src.key, bytes=entry.size)
        return True

    def _upload_files(
        self, ckpt_dir: Path, step: int, entries: list[FileEntry]
    ) -> dict[str, str | None]:
        """Send ``entries``, each checked against its sha256 first: the ETag each must get."""
        # Pipelined: the next file is hashed while earlier ones are on the wire.
        pending = []
        etags: dict[str, str | None] = {}
        try:
            for entry in entries:
                path = ckpt_dir / entry.path
                key = self.file_key(step, entry.path)
                digest = self.etag_digest(entry.size)
                before = _verify_local(ckpt_dir, entry, digest)
                etags[entry.path] = digest.etag() if self.etag_checkable(entry.size) else None
                pending.append((path, key, before, self.start_upload(path, key, entry.sha256)))
            for path, key, before, fut in pending:
                self.wait_upload(fut, key)
                # Hashed before it was sent: a file rewritten since would commit other bytes.
                if _stat_key(path) != before:
                    raise IntegrityError(
                        f"upload {self.location.url(key)}: {path} changed "
                        "while it was uploaded; manifest not written"
                    )
        except BaseException:
            for _path, _key, _before, fut in pending:
                if not fut.done():
                    fut.cancel()
            for _path, _key, _before, fut in pending:
                with contextlib.suppress(Exception):
                    fut.result()
                self._release(fut)
            raise
        return etags

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

        aborted = self._call("abort", prefix, run)
        log.info(
            "multipart_uploads_aborted",
            prefix=prefix,
            aborted=aborted,
            **({"older_than_s": older_than} if older_than is not None else {}),
        )
        return aborted

    # -- restore ----------------------------------------------------------------------

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
                path = download_checkpoint(
                    self.client,
                    self.location,
                    remote.manifest,
                    remote.manifest_raw,
                    remote.objects,
                    local_dir,
                    part_size=self.transfer_config.multipart_chunksize,
                    max_concurrency=self.transfer_config.max_request_concurrency,
                )
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

    # -- complete.json ----------------------------------------------------------------

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

    # -- retention, preflight ---------------------------------------------------------

    def delete_checkpoint(self, step: int) -> None:
        """Delete one remote checkpoint: the manifest first (uncommit), then its files."""
        manifest_key = self.file_key(step, MANIFEST_NAME)
        self._call(
            "delete",
            manifest_key,
            lambda: self.client.delete_object(Bucket=self.location.bucket, Key=manifest_key),
        )
        keys = [o.key for o in self._list(self.step_prefix(step))]
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            resp = self._call(
                "delete",
                self.step_prefix(step),
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
        log.info("checkpoint_deleted", step=step, objects=len(keys))

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
        """Preflight: put and delete a small probe object under the run's prefix."""
        key = self.location.key(self.run_id, f".spot-supervisor-probe-{os.urandom(4).hex()}")
        self._put_bytes(key, b"probe\n", content_type="text/plain")
        self._call(
            "delete", key, lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key)
        )
        log.info("store_writable", bucket=self.location.bucket, key=key)

    # -- S3 calls, errors turned into StoreError --------------------------------------

    def _call(self, action: str, key: str | None, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            raise describe_error(exc, action=action, location=self.location, key=key) from exc

    def _list(self, prefix: str) -> list[RemoteObject]:
        def run() -> list[RemoteObject]:
            paginator = self.client.get_paginator("list_objects_v2")
            found = []
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                for o in page.get("Contents", []):
                    modified = o.get("LastModified")
                    found.append(
                        RemoteObject(
                            o["Key"],
                            o["Size"],
                            o.get("ETag", ""),
                            modified.timestamp() if modified is not None else None,
                        )
                    )
            return found

        return self._call("list", prefix, run)

    # -- for daemon.global_commit -------------------------------------------------------

    def step_objects(self, step: int) -> dict[str, RemoteObject]:
        """Every object of one step, by its path within the step."""
        return self._step_objects(step)

    def committed(self, step: int, objects: dict[str, RemoteObject]) -> RemoteCheckpoint | None:
        """The checkpoint if ``objects`` (one step's listing) make a committed one."""
        return self._committed(step, objects)

    def get_object(self, key: str, *, max_bytes: int) -> tuple[bytes, dict[str, str]] | None:
        """A small object's bytes and metadata (None when it is gone)."""
        return self._get_object(key, missing_ok=True, max_bytes=max_bytes)

    @staticmethod
    def metadata_says_verified(metadata: Mapping[str, str]) -> bool:
        """Whether a manifest's (or part's) metadata says its files passed our sha256."""
        return metadata.get(VERIFIED_META, _SHA256_VERIFIED) == _SHA256_VERIFIED

    def put_manifest(
        self, key: str, raw: bytes, *, verified: bool, if_none_match: bool = False
    ) -> None:
        """Write a manifest; ``if_none_match``: only if no object is there yet."""
        self._switch.check(f"commit {self.location.url(key)}")
        self._put_bytes(
            key,
            raw,
            content_type="application/json",
            metadata={VERIFIED_META: _SHA256_VERIFIED if verified else _PENDING},
            if_none_match=if_none_match,
        )

    def is_committed(self, step: int) -> bool:
        """Whether ``step`` has a manifest in storage (one listing of its prefix)."""
        return MANIFEST_NAME in self._step_objects(step)

    def list_objects(self, prefix: str) -> list[RemoteObject]:
        """Every object under ``prefix`` (one paginated listing)."""
        return self._list(prefix)

    def put_marker(self, key: str) -> None:
        """An empty object whose existence is the message (rendezvous markers)."""
        self._put_bytes(key, b"", content_type="application/octet-stream")

    # -- small coordination objects (leases) -------------------------------------------

    def read_small(self, key: str, max_bytes: int = 64 * 1024) -> tuple[bytes, str] | None:
        """A small object's bytes and ETag; None when it does not exist."""

        def run() -> tuple[bytes, str] | None:
            try:
                resp = self.client.get_object(Bucket=self.location.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            body = resp["Body"].read(max_bytes + 1)
            if len(body) > max_bytes:
                raise IntegrityError(_too_large(self.location.url(key), None, max_bytes))
            return body, normalize_etag(str(resp.get("ETag", "")))

        return self._call("read", key, run)

    def write_small(
        self, key: str, body: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Write a small object conditionally; its new ETag. A lost condition raises
        :class:`StoreError` with code ``PreconditionFailed``."""
        extra: dict[str, Any] = {}
        if if_match is not None:
            extra["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        resp = self._call(
            "write",
            key,
            lambda: self.client.put_object(
                Bucket=self.location.bucket,
                Key=key,
                Body=body,
                ContentType="application/json",
                **extra,
            ),
        )
        return normalize_etag(str(resp.get("ETag", "")))

    def _step_objects(self, step: int) -> dict[str, RemoteObject]:
        prefix = self.step_prefix(step)
        return {o.key[len(prefix) :]: o for o in self._list(prefix)}

    def _get_bytes(self, key: str, *, missing_ok: bool, max_bytes: int) -> bytes | None:
        got = self._get_object(key, missing_ok=missing_ok, max_bytes=max_bytes)
        return None if got is None else got[0]

    def _get_object(
        self, key: str, *, missing_ok: bool, max_bytes: int
    ) -> tuple[bytes, dict[str, str]] | None:
        """A small object's bytes and metadata; :class:`IntegrityError` past ``max_bytes``.

        Anyone who can write to the bucket can make an object of any size: it is never
        read past ``max_bytes`` (the body is closed unread when the length says so).
        """
        url = self.location.url(key)
        try:
            resp = self.client.get_object(Bucket=self.location.bucket, Key=key)
            body = resp["Body"]
            try:
                length = int(resp.get("ContentLength", 0))
                if length > max_bytes:
                    raise IntegrityError(_too_large(url, length, max_bytes))
                data = body.read(max_bytes + 1)
                if len(data) > max_bytes:  # the length header said less
                    raise IntegrityError(_too_large(url, None, max_bytes))
            finally:
                body.close()
            return data, dict(resp.get("Metadata", {}))
        except (ClientError, BotoCoreError) as exc:
            err = describe_error(exc, action="read", location=self.location, key=key)
            if missing_ok and err.code == "NoSuchKey":
                return None
            raise err from exc

    def _put_bytes(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
        if_none_match: bool = False,
    ) -> None:
        extra: dict[str, Any] = {}
        if self._checksum_algorithm:
            extra["ChecksumAlgorithm"] = self._checksum_algorithm
        if if_none_match:
            # Create only: a 412 (StoreError "PreconditionFailed") if someone was first.
            extra["IfNoneMatch"] = "*"
        sha = hashlib.sha256(body).hexdigest()
        md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
        # A server that does not verify the additional checksum (moto, some S3-compatible
        # stores) keeps whatever arrived: check that it holds our bytes as the files are
        # checked (_verify_stored), and send again once. This is the commit itself for a
        # manifest.
        for attempt in (1, 2):
            resp = self._call(
                "write",
                key,
                lambda: self.client.put_object(
                    Bucket=self.location.bucket,
                    Key=key,
                    Body=body,
                    ContentType=content_type,
                    Metadata={"sha256": sha, **(metadata or {})},
                    **extra,
                ),
            )
            if self._verify_stored(key, resp, md5, sha) is not None:
                return
            # What we wrote arrived corrupt: replacing our own object is no conflict.
            extra.pop("IfNoneMatch", None)
            etag = normalize_etag(str(resp.get("ETag", "")))
            log.warning("object_etag_mismatch", key=key, attempt=attempt, etag=etag, md5=md5)
        raise IntegrityError(
            f"{self.location.url(key)}: the server stored other bytes than were sent "
            f"(ETag {etag}, MD5 {md5}; read back, another sha256), twice"
        )


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


LEFTOVER_AGE_S = 3600.0


def started_before(upload: Mapping[str, Any], cutoff: float) -> bool:
    """Whether a listed multipart upload was initiated before ``cutoff`` (epoch seconds);
    an upload with no time is taken as young: never abort what may be in flight."""
    started = upload.get("Initiated")
    return started is not None and started.timestamp() < cutoff


def _has_parts(objects: Mapping[str, RemoteObject]) -> bool:
    return any(path.startswith(PARTS_DIR + "/") for path in objects)


def _untouched(objects: Iterable[RemoteObject], age: float = LEFTOVER_AGE_S) -> bool:
    """Whether no object was written in the last ``age`` seconds (unknown times: written)."""
    cutoff = time.time() - age
    return all(o.last_modified is not None and o.last_modified < cutoff for o in objects)


def _too_large(url: str, size: int | None, limit: int) -> str:
    if size is None:
        return f"{url} has more bytes than it announced, over the limit of {limit}; not read"
    return f"{url} is {size} bytes, over the limit of {limit} bytes for this object; not read"


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


def _stat_key(path: Path) -> tuple[int, int, int]:
    # lstat: a file swapped for a symlink after it was checked is a changed file.
    return _ident(os.lstat(path))


def _ident(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def refuse_unsafe_files(ckpt_dir: Path, manifest: Manifest) -> None:
    """Before anything of a checkpoint is sent: every listed file must be a regular file
    inside ``ckpt_dir``, reached through no symlink (see :func:`daemon.layout.open_listed`).

    A symlink could make us upload anything the daemon can read (``/etc/shadow``, another
    run's files) to the bucket. :class:`IntegrityError` naming the file, after an
    ``upload_refused`` warning. Missing or unreadable files are left to the upload's own
    check (:func:`_verify_local`).
    """
    for entry in manifest.files:
        try:
            with open_listed(ckpt_dir, entry.path):
                pass
        except UnsafePathError as exc:
            path = str(ckpt_dir / entry.path)
            log.warning("upload_refused", step=manifest.step, path=path, reason=str(exc))
            raise IntegrityError(
                f"{exc}; nothing of step {manifest.step} uploaded, manifest not written"
            ) from exc
        except OSError:
            continue


def copy_etag(src: RemoteObject) -> str | None:
    """The ETag a CopyObject of ``src`` gets: the source's when it is a single-part MD5."""
    etag = normalize_etag(src.etag)
    return etag if is_md5_etag(etag) and "-" not in etag else None


def _verify_local(
    ckpt_dir: Path, entry: FileEntry, digest: EtagDigest | None = None
) -> tuple[int, int, int]:
    """Check a local file against its manifest entry; its stat identity for later.

    Read through :func:`daemon.layout.open_listed` (never through a symlink). ``digest``
    is fed with the same bytes (the upload's expected ETag, same pass)."""
    path = ckpt_dir / entry.path
    try:
        with open_listed(ckpt_dir, entry.path) as f:
            before = _ident(os.fstat(f.fileno()))
            if before[1] != entry.size:
                raise IntegrityError(
                    f"{path} has {before[1]} bytes, the manifest says {entry.size}; "
                    "manifest not written"
                )
            h = hashlib.sha256()
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
                if digest is not None:
                    digest.update(chunk)
    except FileNotFoundError:
        # Plain FileNotFoundError on purpose: the usual cause is the trainer pruning an old
        # checkpoint (keep-K) under us, which the sync treats as "gone", not as a failure.
        raise FileNotFoundError(
            errno.ENOENT, "listed in the manifest but missing; manifest not written", str(path)
        ) from None
    except UnsafePathError as exc:
        raise IntegrityError(f"{exc}; manifest not written") from exc
    except OSError as exc:
        raise StoreError(f"read {path}: {exc.strerror or exc}", "OSError") from exc
    if h.hexdigest() != entry.sha256:
        raise IntegrityError(
            f"{path} does not match its sha256 in the manifest; manifest not written"
        )
    return before
