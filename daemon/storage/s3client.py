"""The S3 client, its transfer settings, remote locations, and S3 errors in one line each.

Everything that talks to object storage builds its client here, so timeouts, retries
and addressing are decided once. Errors from botocore are turned into :class:`StoreError`
with a one-line message that names the bucket and key and says what went wrong, because
that line is what an operator reads in the journal.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import boto3
import structlog
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.compat import HAS_CRT
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from s3transfer.exceptions import CancelledError
from s3transfer.futures import BaseTransferFuture
from s3transfer.manager import TransferManager
from s3transfer.utils import ChunksizeAdjuster, OSUtils

if TYPE_CHECKING:
    from botocore.config import _S3Dict
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

MiB = 1024 * 1024

# S3 on AWS serves about 90 MB/s per connection ("one concurrent request for each 85-90
# MB/s of desired network throughput", AWS's performance guidelines), after a first-byte
# latency of tens of milliseconds per request. So throughput comes from connections, and
# each part should be long enough that the wait for its answer costs little: a 16 MiB
# part takes ~186 ms at 90 MB/s, so ~30 ms of latency leaves a connection busy ~86% of
# the time (8 MiB, boto3's default: ~75%), while a drain's tail uploads hold at most
# concurrency x part size in memory (512 MiB). 32 connections carry ~2.5 GB/s: a 7B
# model with Adam (112 GB) in ~45 s, inside a two-minute notice with room for the write.
DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_MAX_CONCURRENCY = 32
# Attempts in all, the first one included (botocore's ``total_max_attempts``).
DEFAULT_MAX_ATTEMPTS = 5
# The additional checksum every upload carries, which S3 verifies on arrival. CRC32 costs
# a fraction of SHA256's CPU (zlib's CRC32 runs at GB/s; SHA256 at ~200 MB/s per core
# without SHA instructions) and catches the same transport corruption.
DEFAULT_CHECKSUM_ALGORITHM = "CRC32"
CHECKSUM_ALGORITHMS = ("SHA256", "CRC32", "CRC32C", "none")
# Those botocore computes only with awscrt installed.
_CRT_ONLY_CHECKSUMS = frozenset({"CRC32C"})
# A short connect timeout: during a drain every second counts, and a dead endpoint should
# fail fast into a retry rather than hang. Reads get longer, for parts under load.
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 20.0

# Lenient on purpose: legacy buckets may hold upper case and underscores, and
# S3-compatible servers are laxer than AWS; S3 itself has the last word.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,254}$")

_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)


class StoreError(RuntimeError):
    """An object-storage operation failed; ``str()`` is one line naming bucket/key and cause.

    ``code`` is the S3 error code (``NoSuchKey``, ``AccessDenied``, ...) or one of
    ``Unreachable``, ``Timeout``, ``NoCredentials``, ``Integrity`` when there is none.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class UploadCancelled(StoreError):
    """An upload was cancelled (the notice deadline is near); nothing was committed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "Cancelled")


class IntegrityError(StoreError):
    """Stored bytes do not match what a manifest says (missing, wrong size, wrong sha256)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "Integrity")


@dataclass(frozen=True)
class RemoteObject:
    """One listed object: its key, size and ETag (the ETag pins the version we listed)."""

    key: str
    size: int
    etag: str
    # Seconds since the epoch, from the listing (None where a caller built one by hand).
    last_modified: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RemoteLocation:
    """A bucket and a key prefix (no leading or trailing slash; may be empty)."""

    bucket: str
    prefix: str = ""

    def key(self, *parts: str) -> str:
        """Join ``parts`` under the prefix with ``/`` (no leading slash for an empty prefix)."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def url(self, key: str = "") -> str:
        """``s3://bucket/key`` for messages."""
        return f"s3://{self.bucket}/{key}"


def parse_remote(value: str) -> RemoteLocation:
    """Parse ``s3://bucket[/prefix]``; ValueError naming the value when it is not one."""
    if not isinstance(value, str) or not value.startswith("s3://"):
        raise ValueError(f"remote {value!r} is not an s3:// URL (expected s3://bucket/prefix)")
    rest = value[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"remote {value!r} names no bucket (expected s3://bucket/prefix)")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"remote {value!r}: {bucket!r} is not a valid bucket name")
    if any(c in value for c in "?#") or any(ch.isspace() for ch in value):
        raise ValueError(f"remote {value!r} contains characters not allowed in an S3 key prefix")
    prefix = prefix.strip("/")
    if "//" in prefix:
        raise ValueError(f"remote {value!r} has an empty path segment in its prefix")
    return RemoteLocation(bucket, prefix)


def checksum_algorithm(value: str) -> str | None:
    """The ``ChecksumAlgorithm`` for a configured ``s3.checksum_algorithm`` (None: ``none``).

    ValueError, naming the value, when it is unknown or this botocore cannot compute it
    (CRC32C needs ``awscrt``).
    """
    if value not in CHECKSUM_ALGORITHMS:
        raise ValueError(f"{value!r} is not one of {', '.join(CHECKSUM_ALGORITHMS)}")
    if value == "none":
        return None
    if value in _CRT_ONLY_CHECKSUMS and not HAS_CRT:
        raise ValueError(
            f"{value} needs awscrt (pip install 'botocore[crt]'), which is not installed;"
            " use CRC32 or SHA256"
        )
    return value


def _s3_options(endpoint_url: str | None, request_checksums: bool) -> _S3Dict | None:
    options: _S3Dict = {}
    if endpoint_url:
        # Custom endpoints (MinIO, moto, ...) rarely serve virtual-hosted buckets.
        options["addressing_style"] = "path"
        if request_checksums and endpoint_url.startswith("http://"):
            # Over https botocore already sends UNSIGNED-PAYLOAD when a checksum header
            # covers the body. Over plain http it would also hash every byte with SHA256
            # for the signature (~4 s of CPU per GB without SHA instructions). The
            # additional checksum (verified by the server) and our ETag check before each
            # commit cover the body instead; headers are still signed.
            options["payload_signing_enabled"] = False
    return options or None


def make_s3_client(
    endpoint_url: str | None,
    region: str | None,
    max_pool_connections: int = 2 * DEFAULT_MAX_CONCURRENCY,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    request_checksums: bool = True,
) -> S3Client:
    """A boto3 S3 client with standard retries, short timeouts and enough connections.

    ``max_attempts`` is the number of attempts of one request in all, the first one
    included (botocore's ``total_max_attempts``; its ``retries.max_attempts`` would
    count retries only): 1 means no retry. ``max_pool_connections`` must be at least
    the transfer concurrency, or transfer threads queue for a connection (it is raised
    to :data:`DEFAULT_MAX_CONCURRENCY` + 2 when given lower). With a custom
    ``endpoint_url`` (MinIO, moto, ...) path-style addressing is used, since such
    servers rarely serve virtual hosts. ``request_checksums=False`` (for
    ``s3.checksum_algorithm = "none"``) stops botocore adding its default CRC32 to
    uploads that ask for no checksum. With checksums, a plain-``http://`` endpoint gets
    unsigned payloads as https ones already do (see :func:`_s3_options`).
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts {max_attempts} must be at least 1")
    max_pool_connections = max(max_pool_connections, DEFAULT_MAX_CONCURRENCY + 2)
    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        request_checksum_calculation="when_supported" if request_checksums else "when_required",
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        # Restore hashes every byte with the manifest's sha256 itself, end to end; botocore's
        # own check of a response checksum would hash the same bytes a second time.
        response_checksum_validation="when_required",
        s3=_s3_options(endpoint_url, request_checksums),
    )
    client: S3Client = boto3.client(
        "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config
    )
    return client


def make_transfer_config(
    part_size: int = DEFAULT_PART_SIZE,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    multipart_threshold: int | None = None,
) -> TransferConfig:
    """Transfer settings for uploads (and the ranged downloads of restore).

    The classic s3transfer client by default; :func:`make_transfer_manager` picks the
    CRT one only when it is installed and no ``endpoint_url`` is set.
    """
    return TransferConfig(
        multipart_threshold=part_size if multipart_threshold is None else multipart_threshold,
        multipart_chunksize=part_size,
        max_concurrency=max_concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )


def crt_available() -> bool:
    """Whether the AWS CRT transfer client (``awscrt``) is installed."""
    return importlib.util.find_spec("awscrt") is not None


def use_crt(endpoint_url: str | None) -> bool:
    """CRT only for AWS itself: the CRT client ignores ``endpoint_url``."""
    return not endpoint_url and crt_available()


_MD5_ETAG_RE = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?$")


def multipart_part_size(config: TransferConfig, size: int) -> int | None:
    """The part size s3transfer uses for a file of ``size`` bytes; None for one PutObject.

    The same rule as s3transfer's upload: multipart from ``multipart_threshold`` on,
    with the configured chunk size adjusted to S3's limits (5 MiB to 5 GiB, at most
    10,000 parts) by s3transfer's own :class:`ChunksizeAdjuster`.
    """
    if size < config.multipart_threshold:
        return None
    chunk: int = ChunksizeAdjuster().adjust_chunksize(config.multipart_chunksize, size)
    return chunk


def normalize_etag(etag: str) -> str:
    """An ETag without its quotes, lower case."""
    return etag.strip().strip('"').lower()


def is_md5_etag(etag: str) -> bool:
    """Whether ``etag`` has the shape of an MD5 (or multipart MD5-of-MD5s) ETag.

    Shape only: SSE-KMS and SSE-C ETags also look like 32 hex digits but are not MD5s,
    so whether an ETag can be compared with an MD5 is :func:`etag_is_md5`'s to say.
    """
    return bool(_MD5_ETAG_RE.match(normalize_etag(etag)))


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


class EndpointIntegrity:
    """How one endpoint's stored objects are verified before a commit; what it learns
    about the endpoint is learnt once per process (:func:`endpoint_integrity`).

    - ``etag``: the ETag is the MD5 of the local bytes (AWS's convention; free).
    - ``server-checksum``: AWS itself only, for objects whose ETag is not an MD5
      (SSE-KMS, DSSE-KMS, SSE-C) and which carry an additional checksum: AWS refuses an
      upload whose bytes do not match the checksum botocore computed from the bytes it
      read, which we had just hashed with sha256 (and whose file did not change). No
      second transfer, which during a two-minute spot notice matters.
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


class EtagDigest:
    """The ETag S3 gives an object of these bytes: MD5, or for multipart the MD5 of the
    parts' MD5s and ``-N``, with the part boundaries s3transfer uses.

    Fed either in order (:meth:`update`, one reading pass that also computes a sha256) or
    by offset (:meth:`feed`, from the readers of parts sent concurrently). Bytes read
    again (botocore's checksum pass, a retried part) are hashed once: each part is hashed
    only while read from its next unhashed offset on.
    """

    def __init__(self, size: int, part_size: int | None) -> None:
        self.size = size
        self.multipart = part_size is not None
        self._part = part_size if part_size is not None else max(size, 1)
        count = max(1, math.ceil(size / self._part))
        self._md5 = [hashlib.md5(usedforsecurity=False) for _ in range(count)]
        self._next = [i * self._part for i in range(count)]
        self._locks = [threading.Lock() for _ in range(count)]
        self._pos = 0

    def update(self, data: bytes | memoryview) -> None:
        """Feed the next bytes of the file, in order."""
        self.feed(self._pos, data)
        self._pos += len(data)

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        """Feed bytes read at ``offset`` (parts in any order; re-reads are ignored)."""
        view = memoryview(data)
        end = offset + len(view)
        pos = offset
        while pos < end:
            i = pos // self._part
            if i >= len(self._md5):
                return
            stop = min(end, (i + 1) * self._part, self.size)
            if stop <= pos:
                return
            with self._locks[i]:
                nxt = self._next[i]
                if pos <= nxt < stop:
                    self._md5[i].update(view[nxt - offset : stop - offset])
                    self._next[i] = stop
            pos = stop

    def etag(self) -> str | None:
        """The expected ETag (no quotes), or None when some bytes were never read."""
        for i, nxt in enumerate(self._next):
            if nxt != min((i + 1) * self._part, self.size):
                return None
        if not self.multipart:
            return self._md5[0].hexdigest()
        joined = b"".join(m.digest() for m in self._md5)
        return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(self._md5)}"


class _DigestingFile:
    """A file opened by s3transfer, feeding an :class:`EtagDigest` with what it reads."""

    def __init__(self, f: IO[bytes], digest: EtagDigest) -> None:
        self._f = f
        self._digest = digest
        self._pos = 0

    def read(self, amount: int | None = None) -> bytes:
        data = self._f.read(amount) if amount is not None else self._f.read()
        self._digest.feed(self._pos, data)
        self._pos += len(data)
        return data

    def seek(self, where: int, whence: int = 0) -> int:
        self._pos = self._f.seek(where, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _DigestingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class RenameTolerantOSUtils(OSUtils):
    """s3transfer's file access, opening a file at its *current* path.

    s3transfer opens an uploaded file by name once per part. A file staged while its
    checkpoint is being written lives in ``.tmp-step-N-*/``, which the writer renames to
    ``step-N/`` while later parts may still be read; ``resolve`` maps the old path to
    the new one, so the upload goes on instead of failing half-way.

    A file :meth:`watch`-ed feeds an :class:`EtagDigest` with the bytes s3transfer reads
    to send, so the upload's expected ETag costs one MD5 and no second read.
    """

    def __init__(self, resolve: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self._resolve = resolve
        self._watched: dict[str, EtagDigest] = {}
        self._watch_lock = threading.Lock()

    def watch(self, filename: str, digest: EtagDigest) -> None:
        """Feed ``digest`` with every read of ``filename`` (the name given to upload)."""
        with self._watch_lock:
            self._watched[filename] = digest

    def unwatch(self, filename: str) -> None:
        with self._watch_lock:
            self._watched.pop(filename, None)

    def _retry(self, fn: Callable[[str], Any], filename: str) -> Any:
        try:
            return fn(filename)
        except FileNotFoundError:
            if self._resolve is None:
                raise
            moved = self._resolve(filename)
            if moved == filename:
                raise
            return fn(moved)

    def get_file_size(self, filename: str) -> int:
        size: int = self._retry(os.path.getsize, filename)
        return size

    def open(self, filename: str, mode: str) -> Any:
        f = self._retry(lambda f: open(f, mode), filename)  # noqa: SIM115 - s3transfer closes it
        with self._watch_lock:
            digest = self._watched.get(filename)
        return f if digest is None else _DigestingFile(f, digest)


def make_transfer_manager(
    client: S3Client,
    config: TransferConfig,
    *,
    crt: bool = False,
    resolve: Callable[[str], str] | None = None,
    osutil: RenameTolerantOSUtils | None = None,
) -> Any:
    """A transfer manager: CRT when ``crt`` (see :func:`use_crt`), else the classic one.

    The classic one is tuned by ``config`` (part size, concurrency) and reads files
    through ``osutil`` (default: a :class:`RenameTolerantOSUtils` with ``resolve``).
    Returns ``Any`` because the CRT manager shares no base class with the classic one;
    both offer ``upload``/``shutdown``.
    """
    if crt:
        crt_config = TransferConfig(
            multipart_threshold=config.multipart_threshold,
            multipart_chunksize=config.multipart_chunksize,
            max_concurrency=config.max_request_concurrency,
            preferred_transfer_client="crt",
        )
        return create_transfer_manager(client, crt_config)
    return TransferManager(client, config, osutil=osutil or RenameTolerantOSUtils(resolve))


# Requests that write: refused once uploads are cancelled. Aborts, deletes, listings and
# reads still go through, so a cancelled upload can clean up after itself.
_WRITE_OPERATIONS = (
    "PutObject",
    "UploadPart",
    "CreateMultipartUpload",
    "CompleteMultipartUpload",
    "CopyObject",
    "UploadPartCopy",
)


class CancelSwitch:
    """One switch that stops every upload through one client, at once and for good.

    Thrown when the notice deadline (less the safety margin) comes: every tracked
    transfer future is cancelled (s3transfer then aborts its multipart upload), parts
    being sent stop at their next read, and any further write request through the
    client fails before it is sent, so no manifest can be written after the switch.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._futures: set[BaseTransferFuture] = set()
        self.reason = ""

    def install(self, client: S3Client) -> None:
        """Refuse write requests through ``client`` once the switch is thrown."""
        for op in _WRITE_OPERATIONS:
            client.meta.events.register(f"before-send.s3.{op}", self._before_send)

    def _before_send(self, **_kwargs: Any) -> None:
        # Raised inside botocore's send: not a transient error, so it is not retried.
        if self._event.is_set():
            raise UploadCancelled(f"upload cancelled: {self.reason}")

    @property
    def cancelled(self) -> bool:
        """Whether the switch has been thrown."""
        return self._event.is_set()

    def check(self, what: str) -> None:
        """Raise :class:`UploadCancelled` (naming ``what``) when the switch is thrown."""
        if self._event.is_set():
            raise UploadCancelled(f"{what}: upload cancelled ({self.reason})")

    def track(self, future: BaseTransferFuture) -> None:
        """Cancel ``future`` with the others (at once, if already thrown)."""
        with self._lock:
            self._futures.add(future)
            thrown = self._event.is_set()
        if thrown:
            future.cancel()

    def untrack(self, future: BaseTransferFuture) -> None:
        with self._lock:
            self._futures.discard(future)

    def cancel(self, reason: str) -> int:
        """Throw the switch; the number of transfers it cancelled."""
        with self._lock:
            if self._event.is_set():
                return 0
            self.reason = reason
            self._event.set()
            futures = list(self._futures)
        for f in futures:
            if not f.done():
                f.cancel()
        log.warning("uploads_cancelled", reason=reason, transfers=len(futures))
        return len(futures)


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` (possibly wrapped by botocore) comes from a :class:`CancelSwitch`."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (UploadCancelled, CancelledError)):
            return True
        inner = getattr(cur, "kwargs", {}).get("error") if hasattr(cur, "kwargs") else None
        cur = inner if isinstance(inner, BaseException) else (cur.__cause__ or cur.__context__)
    return False


def _client_error_code(exc: ClientError) -> tuple[str, str, int]:
    err = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    code = str(err.get("Code") or status or "Unknown")
    message = str(err.get("Message") or "").strip()
    # HEAD responses carry no body, so S3 reports only the status as the code.
    if code == "404":
        code = "NotFound"
    elif code == "403":
        code = "AccessDenied"
    return code, message, status


def describe_error(
    exc: BaseException, *, action: str, location: RemoteLocation, key: str | None = None
) -> StoreError:
    """A :class:`StoreError` for a failed S3 call: one line, naming the object and the cause.

    ``action`` says what we were doing (``upload``, ``list``, ...); ``key`` is the object,
    or None when the call was about the bucket or a prefix.
    """
    what = location.url(key) if key is not None else f"bucket {location.bucket!r}"
    if isinstance(exc, StoreError):
        return exc
    if is_cancellation(exc):
        return UploadCancelled(f"{action} {what}: upload cancelled")
    if isinstance(exc, ClientError):
        code, message, status = _client_error_code(exc)
        if code == "NoSuchBucket":
            return StoreError(f"{action} {what}: bucket {location.bucket!r} does not exist", code)
        if code in ("NoSuchKey", "NotFound"):
            return StoreError(f"{action} {what}: object does not exist", "NoSuchKey")
        if code == "AccessDenied" or status == 403:
            return StoreError(
                f"{action} {what}: access denied (check the role's S3 permissions"
                f" on bucket {location.bucket!r})",
                "AccessDenied",
            )
        if code in _CREDENTIAL_CODES:
            return StoreError(f"{action} {what}: credentials rejected ({code})", code)
        if code in _THROTTLE_CODES or status == 503:
            return StoreError(
                f"{action} {what}: throttled by S3 ({code}) after retries", "Throttled"
            )
        if code == "PreconditionFailed":
            return StoreError(f"{action} {what}: object changed during the transfer", code)
        detail = f": {message}" if message else ""
        return StoreError(f"{action} {what}: {code}{detail}", code)
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError)):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "the S3 endpoint")
        return StoreError(f"{action} {what}: cannot reach {endpoint}", "Unreachable")
    if isinstance(exc, ReadTimeoutError):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "the S3 endpoint")
        return StoreError(f"{action} {what}: timed out waiting for {endpoint}", "Timeout")
    if isinstance(exc, NoCredentialsError):
        return StoreError(f"{action} {what}: no AWS credentials found", "NoCredentials")
    if isinstance(exc, BotoCoreError):
        return StoreError(f"{action} {what}: {exc}", type(exc).__name__)
    if isinstance(exc, OSError):
        return StoreError(f"{action} {what}: {exc.strerror or exc}", "OSError")
    return StoreError(f"{action} {what}: {type(exc).__name__}: {exc}", type(exc).__name__)
