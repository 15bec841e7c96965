"""Does the server hold our bytes? ETags where they are MD5s, else AWS checksums or a read-back."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

import structlog

from daemon.layout import (
    HASH_CHUNK,
    Manifest,
)
from daemon.storage.errors import IntegrityError, StoreError
from daemon.storage.etags import normalize_etag
from daemon.storage.integrity import (
    BY_ETAG,
    BY_READ_BACK,
    BY_SERVER_CHECKSUM,
    BY_SERVER_VERIFIED,
    CHECKSUM_REFUSALS,
    EndpointIntegrity,
    additional_checksum,
    encryption_hiding_md5,
    endpoint_integrity,
)
from daemon.storage.locations import RemoteObject
from daemon.storage.records import (
    _PENDING,
    _SHA256_VERIFIED,
    VERIFIED_META,
    RemoteCheckpoint,
    _ListingCheck,
)
from daemon.storage.transfers import TransferLayer

log = structlog.get_logger(__name__)


class VerifyLayer(TransferLayer):
    """Does the server hold our bytes? ETags where they are MD5s, else AWS checksums or a
    read-back."""

    def _check_listing(
        self,
        step: int,
        manifest: Manifest,
        listed: Mapping[str, RemoteObject],
        expected: Mapping[str, str | None],
        served: Collection[str] = (),
    ) -> _ListingCheck:
        """Every file of ``manifest`` listed with its size, and whether it holds the
        local bytes (see :meth:`_verify_stored`). ``served``: files whose expected ETag
        is the server's answer to our checksum-verified upload (no MD5 of ours to check
        against: another ETag means another object)."""
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
                # The common case: no request.
                check.how[entry.path] = BY_SERVER_VERIFIED if entry.path in served else BY_ETAG
                continue
            if entry.path in served:
                check.bad.append(entry.path)  # not the object our upload made: send again
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

    @property
    def server_verifies_checksums(self) -> bool:
        """Whether this endpoint refuses an upload of ours whose bytes do not match its
        additional checksum (AWS; another server once :meth:`probe_checksum_verification`
        found it to): the ETag it answers then names bytes it verified."""
        return self._checksum_algorithm is not None and self._integrity.verifies_checksums

    def probe_checksum_verification(self) -> bool:
        """Learn, once per process and endpoint, whether the server refuses a body whose
        additional checksum is wrong: one small PutObject under the run's prefix, with the
        checksum of other bytes. AWS is known to (BadDigest) and is not asked; moto and
        s3rver store the body, which is deleted again. Anything else (the request failed
        otherwise, CRC32C whose value botocore computes) leaves it unknown, which counts
        as not verifying: uploads then keep their MD5s for the ETag check."""
        if self._checksum_algorithm is None:  # also every GCS and Azure store: no S3 client
            return False
        integrity = self._integrity
        if integrity.checksums_probed:
            return self.server_verifies_checksums
        wrong = additional_checksum(self._checksum_algorithm, b"not the probe's bytes")
        if not wrong:
            return False
        key = self._probe_key()
        try:
            self._put_object(key, b"checksum probe\n", "text/plain", **wrong)
        except StoreError as exc:
            if exc.code not in CHECKSUM_REFUSALS:
                log.warning("checksum_probe_failed", key=key, error=str(exc))
                return False
            verifies = True
        else:
            verifies = False
            try:
                self._delete_key(key)
            except StoreError as exc:  # a leftover probe is no reason to stop a run
                log.warning("checksum_probe_not_deleted", key=key, error=str(exc))
        integrity.learn_checksum_verification(verifies, key)
        return verifies

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
        # While the endpoint's multipart convention is unknown, the read-back also
        # computes the whole object's MD5: s3rver-like servers use that as the ETag.
        learn = multipart and not self._integrity.multipart_whole_md5
        got_sha, got_md5 = self._read_back(key, md5=learn)
        if got_sha != sha256:
            return None
        if encryption_hiding_md5(fields) is None:
            # Unencrypted, the right bytes, not their MD5: the endpoint's own ETags.
            self._integrity.etag_convention_differs(
                multipart=multipart, key=key, etag=etag, expected=md5_etag
            )
            if learn and got_md5 == etag:
                self._integrity.learn_whole_md5(key, etag)
        return BY_READ_BACK

    def _probe_key(self) -> str:
        """A fresh key for a small probe object under the run's prefix."""
        return self.location.key(self.run_id, f".spot-supervisor-probe-{os.urandom(4).hex()}")

    def etag_if_sha256(self, key: str, sha256: str) -> str | None:
        """The ETag of the object at ``key`` when the bytes it serves hash to ``sha256``
        and its ETag was the same before and after they were read; None otherwise. For
        an upload whose answer was lost: what the key holds is then known only by
        reading it."""
        before = normalize_etag(str(self._head(key).get("ETag") or ""))
        if not before or self._read_back_sha256(key) != sha256:
            return None
        after = normalize_etag(str(self._head(key).get("ETag") or ""))
        return before if after == before else None

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
        return self._read_back(key)[0]

    def _read_back(self, key: str, *, md5: bool = False) -> tuple[str, str | None]:
        """The sha256 (and with ``md5``, the MD5) of the object's bytes as served; stopped
        by the cancel switch, since no manifest may follow it then."""
        what = f"verify {self.location.url(key)}"
        h = hashlib.sha256()
        m = hashlib.md5(usedforsecurity=False) if md5 else None

        def sink(chunk: bytes) -> None:
            self._switch.check(what)
            h.update(chunk)
            if m is not None:
                m.update(chunk)

        self._read_whole(key, sink)
        return h.hexdigest(), m.hexdigest() if m is not None else None

    def _read_whole(self, key: str, sink: Callable[[bytes], None]) -> None:
        """Feed ``sink`` the object's bytes as the server returns them, in order (one
        streamed GET)."""

        def run() -> None:
            body = self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"]
            try:
                for chunk in body.iter_chunks(HASH_CHUNK):
                    sink(chunk)
            finally:
                body.close()

        self._call("verify", key, run)

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

    def _put_bytes(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] | None = None,
        if_none_match: bool = False,
    ) -> None:
        """Write a small object of ours (a manifest, a marker, a probe) with its sha256 in
        its metadata, and see that the server holds these bytes (:meth:`_write_checked`).
        ``if_none_match``: only if no object is there yet."""
        sha = hashlib.sha256(body).hexdigest()
        meta = {"sha256": sha, **(metadata or {})}
        self._write_checked(key, body, content_type, meta, if_none_match)

    def _write_checked(
        self, key: str, body: bytes, content_type: str, metadata: dict[str, str], create: bool
    ) -> None:
        """Write ``body`` in one request (``create``: only if no object is there yet) and
        see that the server holds it; ``metadata`` carries its sha256."""
        extra: dict[str, Any] = {}
        if self._checksum_algorithm:
            extra["ChecksumAlgorithm"] = self._checksum_algorithm
        if create:
            # Create only: a 412 (StoreError "PreconditionFailed") if someone was first.
            extra["IfNoneMatch"] = "*"
        sha = metadata["sha256"]
        md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
        # A server that does not verify the additional checksum (moto, some S3-compatible
        # stores) keeps whatever arrived: check that it holds our bytes as the files are
        # checked (_verify_stored), and send again once. This is the commit itself for a
        # manifest.
        for attempt in (1, 2):
            resp = self._put_object(key, body, content_type, Metadata=metadata, **extra)
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

    def put_marker(self, key: str) -> None:
        """An empty object whose existence is the message (rendezvous markers)."""
        self._put_bytes(key, b"", content_type="application/octet-stream")
