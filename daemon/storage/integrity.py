"""Which ETags are MD5s, and how one endpoint's stored objects are verified before a commit.

The rules (:func:`etag_is_md5`, :func:`encryption_hiding_md5`, :func:`server_checksum`)
read an object's response fields; :class:`EndpointIntegrity` applies them and learns,
once per process and endpoint, where an S3-compatible server's ETags follow another
convention. The ETag of given bytes is computed in :mod:`daemon.storage.etags`; the
requests that verify are the store's (:mod:`daemon.storage.verify`), not this module's.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import zlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import structlog

from daemon.storage.etags import is_md5_etag

log = structlog.get_logger(__name__)

# Server-side encryption whose ETags are not the MD5 of the object's bytes (AWS: "objects
# encrypted by SSE-C or SSE-KMS have ETags that are not an MD5 digest of their object
# data"; DSSE-KMS is KMS twice over). SSE-S3 ("AES256") ETags are MD5s like plain ones.
NON_MD5_SSE = frozenset({"aws:kms", "aws:kms:dsse"})
# The additional checksums S3 keeps with an object, as response fields.
_CHECKSUM_FIELDS = (
    "ChecksumCRC32",
    "ChecksumCRC32C",
    "ChecksumCRC64NVME",
    "ChecksumSHA1",
    "ChecksumSHA256",
)


def encryption_hiding_md5(fields: Mapping[str, Any]) -> str | None:
    """The encryption (``SSE aws:kms``, ``SSE aws:kms:dsse``, ``SSE-C``) that makes the
    ETag of an object not its MD5, from its response fields (PutObject, HeadObject,
    CompleteMultipartUpload: ``ServerSideEncryption``, ``SSECustomerAlgorithm``); None
    for none or SSE-S3."""
    sse = str(fields.get("ServerSideEncryption") or "").lower()
    if sse in NON_MD5_SSE:
        return f"SSE {sse}"
    if fields.get("SSECustomerAlgorithm"):
        return "SSE-C"
    return None


def etag_is_md5(fields: Mapping[str, Any]) -> bool:
    """The one rule: whether the ``ETag`` in an object's response fields can be compared
    with an MD5 of its bytes (or, multipart, AWS's MD5 of the parts' MD5s and ``-N``).

    Not for SSE-KMS, DSSE-KMS or SSE-C objects (:func:`encryption_hiding_md5`), nor an
    ETag not shaped like one. Even then it is AWS's convention, not a promise: an
    S3-compatible server may compute its ETags otherwise, which
    :class:`EndpointIntegrity` learns per endpoint.
    """
    return encryption_hiding_md5(fields) is None and is_md5_etag(str(fields.get("ETag") or ""))


def server_checksum(fields: Mapping[str, Any]) -> str | None:
    """The additional checksum the server keeps for an object (``ChecksumCRC32: ...``),
    from its response fields (HeadObject needs ``ChecksumMode="ENABLED"``); None if none."""
    for name in _CHECKSUM_FIELDS:
        value = fields.get(name)
        if value:
            return f"{name}: {value}"
    return None


def is_aws_endpoint(endpoint_url: str) -> bool:
    """Whether ``endpoint_url`` is AWS S3 itself (regional, FIPS, dual-stack, VPC endpoints)."""
    host = (urlsplit(endpoint_url).hostname or "").lower().rstrip(".")
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


# How the bytes an object holds were found to be the local ones (see EndpointIntegrity).
BY_ETAG = "etag"
BY_SERVER_CHECKSUM = "server-checksum"
BY_READ_BACK = "read-back"
BY_SERVER_VERIFIED = "server-verified"
# The error codes of a server that refused a body whose additional checksum it computed
# otherwise: AWS's BadDigest, and what some S3-compatible servers say instead.
CHECKSUM_REFUSALS = frozenset({"BadDigest", "XAmzContentChecksumMismatch"})


def additional_checksum(algorithm: str | None, data: bytes | bytearray) -> dict[str, str]:
    """The additional checksum of ``data`` as a request field (``{"ChecksumCRC32": ...}``),
    for CRC32 and SHA256; empty for none or one botocore computes itself (CRC32C)."""
    if algorithm == "CRC32":
        raw = zlib.crc32(data).to_bytes(4, "big")
        return {"ChecksumCRC32": base64.b64encode(raw).decode("ascii")}
    if algorithm == "SHA256":
        return {"ChecksumSHA256": base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")}
    return {}


class EndpointIntegrity:
    """How one endpoint's stored objects are verified before a commit; what it learns
    about the endpoint is learnt once per process (:func:`endpoint_integrity`).

    - ``etag``: the ETag is the MD5 of the local bytes (AWS's convention; free).
    - ``server-checksum``: AWS itself only, for objects whose ETag is not an MD5
      (SSE-KMS, DSSE-KMS, SSE-C) and which carry an additional checksum: AWS refuses an
      upload whose bytes do not match the checksum botocore computed from the bytes it
      read, which we had just hashed with sha256 (and whose file did not change). No
      second transfer, which during a two-minute spot notice matters.
    - ``server-verified``: an endpoint that refuses a body not matching its additional
      checksum (:attr:`verifies_checksums`: AWS, or a server found to by a probe) answers
      an upload with an ETag of bytes it verified; the object listed with that ETag is
      the one uploaded. Our sha256 of the same buffers that carried the checksum ties
      them to the manifest: no MD5 of ours is needed (the emergency tail computes none).
    - ``read-back``: everything else. The object is read back and hashed with sha256.
      A server's echo of a checksum proves nothing unless the server verified it (moto
      and s3rver keep whatever arrives), so only the bytes themselves are trusted.

    An ETag that should be an MD5 but is not the local bytes' is read back too: when the
    bytes are right, the endpoint does not follow the convention for that kind of upload
    (single or multipart), which is logged once (``etag_convention_differs``) and from
    then on such objects are read back; when they differ, it is corruption.

    Some servers (s3rver) give a multipart object the MD5 of its whole bytes as ETag,
    not AWS's MD5 of the parts' MD5s. A read-back that finds exactly that is learnt
    (:attr:`multipart_whole_md5`): from then on an upload whose bytes are hashed in order
    predicts that ETag instead (:meth:`TransferLayer.etag_digest`), and is checked by its
    ETag again rather than read back, which would double what a commit moves.
    """

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        self.aws = is_aws_endpoint(endpoint_url)
        self._lock = threading.Lock()
        self._not_md5: set[str] = set()  # "single" / "multipart": ETags proven not MD5s
        self.multipart_whole_md5 = False  # multipart ETags are the whole object's MD5
        # Whether a body not matching its x-amz-checksum-* header is refused (BadDigest).
        # AWS documents that it is; any other endpoint is asked once, by a probe.
        self.verifies_checksums = self.aws
        self.checksums_probed = self.aws

    def learn_checksum_verification(self, verifies: bool, key: str) -> None:
        """What a probe found: whether this endpoint refused a body under a wrong
        checksum (logged once; the first probe's answer stands)."""
        with self._lock:
            if self.checksums_probed:
                return
            self.checksums_probed = True
            self.verifies_checksums = verifies
        log.info(
            "endpoint_checksums_learned",
            endpoint=self.endpoint_url,
            verifies_checksums=verifies,
            key=key,
        )

    def learn_whole_md5(self, key: str, etag: str) -> None:
        """A multipart object read back has its whole bytes' MD5 as ETag (logged once)."""
        with self._lock:
            if self.multipart_whole_md5:
                return
            self.multipart_whole_md5 = True
        log.info(
            "etag_convention_learned",
            endpoint=self.endpoint_url,
            uploads="multipart",
            convention="MD5 of the whole object",
            key=key,
            etag=etag,
        )

    @staticmethod
    def _kind(multipart: bool) -> str:
        return "multipart" if multipart else "single"

    def follows_md5_convention(self, multipart: bool) -> bool:
        """Whether nothing has shown this endpoint's ETags of such uploads to be other
        than AWS's MD5 convention."""
        with self._lock:
            return self._kind(multipart) not in self._not_md5

    def method(self, fields: Mapping[str, Any], *, multipart: bool) -> str:
        """How to verify an object, from its response fields: :data:`BY_ETAG`,
        :data:`BY_SERVER_CHECKSUM` or :data:`BY_READ_BACK` (see the class)."""
        if etag_is_md5(fields) and self.follows_md5_convention(multipart):
            return BY_ETAG
        if self.aws and encryption_hiding_md5(fields) and server_checksum(fields):
            return BY_SERVER_CHECKSUM
        return BY_READ_BACK

    def etag_convention_differs(
        self, *, multipart: bool, key: str, etag: str, expected: str | None
    ) -> None:
        """Record that an unencrypted object holding the right bytes (read back) has an
        ETag that is not their MD5: such objects of this endpoint are read back from now
        on. Logged the first time only."""
        kind = self._kind(multipart)
        with self._lock:
            if kind in self._not_md5:
                return
            self._not_md5.add(kind)
        log.info(
            "etag_convention_differs",
            endpoint=self.endpoint_url,
            uploads=kind,
            method=BY_READ_BACK,
            key=key,
            etag=etag,
            md5_etag=expected,
        )


_ENDPOINTS: dict[str, EndpointIntegrity] = {}
_ENDPOINTS_LOCK = threading.Lock()


def endpoint_integrity(endpoint_url: str) -> EndpointIntegrity:
    """The one :class:`EndpointIntegrity` of ``endpoint_url`` in this process."""
    with _ENDPOINTS_LOCK:
        found = _ENDPOINTS.get(endpoint_url)
        if found is None:
            found = _ENDPOINTS[endpoint_url] = EndpointIntegrity(endpoint_url)
        return found
