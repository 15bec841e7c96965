"""A local checkpoint into storage: files first (server-side copies where unchanged),
manifest last."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from daemon.layout import (
    HASH_CHUNK,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    UnsafePathError,
    open_listed,
    parse_manifest,
)
from daemon.storage.errors import IntegrityError, StoreError, UploadCancelled, describe_error
from daemon.storage.etags import EtagDigest, is_md5_etag, normalize_etag
from daemon.storage.global_commit import (
    incarnation_of,
    is_node_part,
    part_key,
    try_global_commit,
)
from daemon.storage.integrity import (
    BY_ETAG,
    BY_READ_BACK,
    BY_SERVER_CHECKSUM,
    BY_SERVER_VERIFIED,
)
from daemon.storage.locations import RemoteObject
from daemon.storage.records import (
    _MAX_COPY_BYTES,
    RemoteCheckpoint,
    StagedFile,
    UploadResult,
    _mbps,
)
from daemon.storage.retention import (
    RetentionLayer,
)

log = structlog.get_logger(__name__)


# Threads that check files against the manifest while they are sent (hashlib releases
# the GIL): each hashes about 0.4 GB/s here (sha256 and the ETag's MD5 of every byte).
COMMIT_HASH_WORKERS = 2


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


def _missing(path: Path) -> FileNotFoundError:
    # Plain FileNotFoundError on purpose: the usual cause is the trainer pruning an old
    # checkpoint (keep-K) under us, which the sync treats as "gone", not as a failure.
    return FileNotFoundError(
        errno.ENOENT, "listed in the manifest but missing; manifest not written", str(path)
    )


def _ident_now(ckpt_dir: Path, entry: FileEntry) -> tuple[int, int, int]:
    """A listed file's stat identity before anything of it is read."""
    path = ckpt_dir / entry.path
    try:
        return _stat_key(path)
    except FileNotFoundError:
        raise _missing(path) from None


def _verify_local(
    ckpt_dir: Path,
    entry: FileEntry,
    digest: EtagDigest | None = None,
    ident: tuple[int, int, int] | None = None,
) -> tuple[int, int, int]:
    """Check a local file against its manifest entry; its stat identity for later.

    Read through :func:`daemon.layout.open_listed` (never through a symlink). ``digest``
    is fed with the same bytes (the upload's expected ETag, same pass). ``ident``: the
    identity the file had when its upload started; a file that has another one now was
    changed (or replaced) in between, and what was sent may not be what is hashed."""
    path = ckpt_dir / entry.path
    try:
        with open_listed(ckpt_dir, entry.path) as f:
            before = _ident(os.fstat(f.fileno()))
            if ident is not None and before != ident:
                raise IntegrityError(f"{path} changed while it was uploaded; manifest not written")
            if before[1] != entry.size:
                raise IntegrityError(
                    f"{path} has {before[1]} bytes, the manifest says {entry.size}; "
                    "manifest not written"
                )
            h = hashlib.sha256()
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
                if digest is not None:
                    digest.update(chunk)
    except FileNotFoundError:
        raise _missing(path) from None
    except UnsafePathError as exc:
        raise IntegrityError(f"{exc}; manifest not written") from exc
    except OSError as exc:
        raise StoreError(f"read {path}: {exc.strerror or exc}", "OSError") from exc
    if h.hexdigest() != entry.sha256:
        raise IntegrityError(
            f"{path} does not match its sha256 in the manifest; manifest not written"
        )
    return before


class CommitLayer(RetentionLayer):
    """A local checkpoint into storage: files first (server-side copies where unchanged), manifest
    last.
    """

    def upload_checkpoint(
        self,
        ckpt_dir: Path,
        manifest: Manifest,
        *,
        previous: RemoteCheckpoint | None = None,
        staged: Mapping[str, StagedFile] | None = None,
    ) -> UploadResult:
        """Commit a complete local checkpoint: every file, then the manifest last.

        Each file is hashed while it is sent and must match the manifest, and must
        not change while it is sent; otherwise nothing is committed
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
            self._delete_key(manifest_key)
        staged = dict(staged or {})
        entries = {e.path: e for e in manifest.files}
        try:
            copied = self._copy_unchanged(manifest, previous, exclude=set(staged))
            to_send = [e for e in manifest.files if e.path not in staged and e.path not in copied]
            expected: dict[str, str | None] = {p: f.etag for p, f in staged.items()}
            expected.update(copied)
            expected.update(self._upload_files(ckpt_dir, step, to_send))
            unverified = {p for p, f in staged.items() if not f.sha256_checked and p in entries}
            served = {p for p, f in staged.items() if f.etag_served}

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
                step,
                manifest,
                manifest_raw,
                expected,
                resend=resend,
                pending=unverified,
                served=served,
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
        served: set[str] | None = None,
    ) -> RemoteCheckpoint:
        """Write the manifest (the commit) once the server holds the bytes we sent.

        The listing must show every file with its size, and each file must hold the
        local bytes: its ETag is the one ``expected`` gives (the MD5 of the local bytes,
        or for multipart the MD5 of the parts' MD5s and ``-N``), or, where the ETag is
        not that (SSE-KMS, DSSE-KMS, SSE-C; a server with its own ETags), the object is
        verified as :class:`~daemon.storage.integrity.EndpointIntegrity` decides: AWS's checksum
        check, or read back and hashed against the manifest's sha256. A file holding
        other bytes is sent again once with ``resend`` (which returns its new expected
        ETag), then :class:`IntegrityError`. Files without an expected ETag are not
        checked. ``checkpoint_etags_checked`` says how each file was. ``pending`` (files
        not yet checked against the manifest's sha256; those read back or sent again
        are) makes the commit ``pending`` instead of ``sha256``-verified. ``served``: files
        whose expected ETag is the server's answer to an upload whose checksum it verified
        (:data:`~daemon.storage.integrity.BY_SERVER_VERIFIED`); listed with another, such
        a file is another object (replaced since) and is sent again.
        """
        expected = dict(expected or {})
        pending = pending if pending is not None else set()
        served = set(served or ())
        check = self._check_listing(step, manifest, self._step_objects(step), expected, served)
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
                served.discard(path)  # now checked as any upload of ours
            check = self._check_listing(step, manifest, self._step_objects(step), expected, served)
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
            server_verified=len(check.by(BY_SERVER_VERIFIED)),
            read_back=check.by(BY_READ_BACK),
            server_checksum=check.by(BY_SERVER_CHECKSUM),
            unchecked=check.skipped,
        )
        verified = not pending
        manifest_key = self.file_key(step, MANIFEST_NAME)
        if self.node_id is not None and is_node_part(manifest):
            # One node's share: its part manifest, never the step's commit.
            manifest_key = part_key(self, step, incarnation_of(manifest), self.node_id)
        self.put_manifest(manifest_key, manifest_raw, verified=verified)
        return RemoteCheckpoint(step, manifest, manifest_key, manifest_raw, check.objects, verified)

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
        """Send ``entries``, each checked against its sha256 while it is sent: the ETag
        each must get.

        Every upload starts at once and :data:`COMMIT_HASH_WORKERS` threads hash the files
        in order meanwhile: no byte waits on the wire for a hash (checking the first file
        before sending it cost 0.6 s per 256 MiB, 5 % of a 1 GiB upload at 100 MB/s). The
        commit still never goes ahead of the checks: a file that does not match the
        manifest, or that changed while it was read, fails it before the manifest (its
        object, like any of a failed commit, is never committed).
        """
        pending = []
        etags: dict[str, str | None] = {}
        hasher = ThreadPoolExecutor(
            max_workers=COMMIT_HASH_WORKERS, thread_name_prefix="commit-hash"
        )
        try:
            for entry in entries:
                path = ckpt_dir / entry.path
                key = self.file_key(step, entry.path)
                digest = self.etag_digest(entry.size)
                # Taken before the upload reads a byte: any change after it shows.
                ident = _ident_now(ckpt_dir, entry)
                check = hasher.submit(_verify_local, ckpt_dir, entry, digest, ident)
                upload = self.start_upload(path, key, entry.sha256)
                pending.append((entry, path, key, digest, check, upload))
            for entry, path, key, digest, check, fut in pending:
                before = check.result()  # first: a file pruned meanwhile is "gone"
                etags[entry.path] = digest.etag() if self.etag_checkable(entry.size) else None
                self.wait_upload(fut, key, before[1])
                # Hashed as it was sent: a file rewritten since would commit other bytes.
                if _stat_key(path) != before:
                    raise IntegrityError(
                        f"upload {self.location.url(key)}: {path} changed "
                        "while it was uploaded; manifest not written"
                    )
        except BaseException:
            for *_, check, fut in pending:
                check.cancel()
                if not fut.done():
                    fut.cancel()
            for *_, fut in pending:
                with contextlib.suppress(Exception):
                    fut.result()
                self._release(fut)
            raise
        finally:
            hasher.shutdown(wait=True, cancel_futures=True)
        return etags
