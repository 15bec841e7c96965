"""The S3 client and its transfer settings: timeouts, retries, addressing, part size.

Everything that talks to S3 builds its client here (:func:`make_s3_client`), so
timeouts, retries and addressing are decided once, with the quirks of S3-compatible
endpoints (path-style addressing, unsigned payloads over plain http); and its transfer
manager (:func:`make_transfer_manager`), which reads files at their current path and
feeds the expected ETag as it reads them.

The rest of the S3 layer lives next door, re-exported here for the callers that import
it from this module: remote URLs in :mod:`~daemon.storage.locations`, errors in one line
in :mod:`~daemon.storage.errors`, ETag maths in :mod:`~daemon.storage.etags`, which
ETags are MD5s in :mod:`~daemon.storage.integrity`, the cancel switch in
:mod:`~daemon.storage.cancel`. What must not live here: requests (the store's layers
make them) and decisions about what a failure means.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.compat import HAS_CRT
from botocore.config import Config
from s3transfer.manager import TransferManager
from s3transfer.utils import OSUtils

from daemon.storage.cancel import CancelSwitch
from daemon.storage.errors import (
    IntegrityError,
    StoreError,
    UploadCancelled,
    describe_error,
    is_cancellation,
)
from daemon.storage.etags import (
    DigestingReader,
    EtagDigest,
    is_md5_etag,
    multipart_part_size,
    normalize_etag,
)
from daemon.storage.integrity import (
    BY_ETAG,
    BY_READ_BACK,
    BY_SERVER_CHECKSUM,
    NON_MD5_SSE,
    EndpointIntegrity,
    encryption_hiding_md5,
    endpoint_integrity,
    etag_is_md5,
    is_aws_endpoint,
    server_checksum,
)
from daemon.storage.locations import RemoteLocation, RemoteObject, parse_remote

if TYPE_CHECKING:
    from botocore.config import _S3Dict
    from mypy_boto3_s3 import S3Client

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
# The connect timeout is not only the TCP connect's: urllib3 (under botocore, requests
# and Azure's SDK alike) keeps it on the socket while the whole request is sent, so it
# is also the longest a part's body may stall on a full send window. At 3 s (this
# project's earlier value) a server or path under load that stopped reading a connection
# for 3 s failed the part, which was then sent again from its first byte: 17 to 39 of the
# 128 parts of a 2 GiB upload through the shaped moto, none at 10 s. 10 s still fails a
# dead endpoint into a retry well inside a drain (botocore's own default is 60 s). Reads
# (the wait for an answer) get longer, for parts under load.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 20.0
# CompleteMultipartUpload's answer waits for the server to assemble the object. That
# "could take several minutes", AWS says, and S3 keeps the connection alive meanwhile by
# sending whitespace, so no read timeout ends it there. Servers that send nothing until
# they are done (s3rver, moto) took up to 25 s for a 256 MiB object under load here; at
# the 20 s read timeout botocore sent the complete again and s3rver assembled the object
# a second time (256 MiB more to read, hash and write on the server, in the middle of an
# emergency upload). So the complete alone waits as long as botocore's own default.
COMPLETE_READ_TIMEOUT = 60.0

T = TypeVar("T")


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
    complete_read_timeout: float = COMPLETE_READ_TIMEOUT,
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
    ``complete_read_timeout`` is the read timeout of CompleteMultipartUpload alone (see
    :data:`COMPLETE_READ_TIMEOUT` and :func:`_complete_waits_longer`).
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
    if complete_read_timeout != read_timeout:
        twin: S3Client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            config=config.merge(Config(read_timeout=complete_read_timeout)),
        )
        _complete_waits_longer(client, twin)
    return client


def _complete_waits_longer(client: S3Client, twin: S3Client) -> None:
    """Send ``client``'s CompleteMultipartUpload requests over ``twin``'s HTTP session
    (the same settings but a longer read timeout); every other request, and the retries
    and errors of all, stay ``client``'s.

    botocore has no per-request timeout. A ``before-send`` handler that returns a
    response is botocore's documented way to answer a request in place of the endpoint:
    here the signed request goes out unchanged over the twin's connection pool (its
    proxies, TLS verification and client certificate come from the same arguments).
    """
    session = twin._endpoint.http_session  # type: ignore[attr-defined]  # botocore's, no public accessor

    def send(request: Any, **_: Any) -> Any:
        return session.send(request)

    client.meta.events.register("before-send.s3.CompleteMultipartUpload", send)


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


def at_current_path(
    fn: Callable[[str], T], filename: str, resolve: Callable[[str], str] | None
) -> T:
    """``fn(filename)``, or when the file is not there, ``fn`` of the path ``resolve`` says
    it has moved to (a staged file's ``.tmp-`` directory renamed into place meanwhile)."""
    try:
        return fn(filename)
    except FileNotFoundError:
        if resolve is None:
            raise
        moved = resolve(filename)
        if moved == filename:
            raise
        return fn(moved)


class _DigestingFile(DigestingReader):
    """A file opened by s3transfer, feeding an :class:`EtagDigest` with what it reads."""

    def __init__(self, f: IO[bytes], digest: EtagDigest) -> None:
        super().__init__(f, digest)

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

    def _retry(self, fn: Callable[[str], T], filename: str) -> T:
        return at_current_path(fn, filename, self._resolve)

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


__all__ = [
    "BY_ETAG",
    "BY_READ_BACK",
    "BY_SERVER_CHECKSUM",
    "CHECKSUM_ALGORITHMS",
    "DEFAULT_CHECKSUM_ALGORITHM",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "DEFAULT_READ_TIMEOUT",
    "NON_MD5_SSE",
    "CancelSwitch",
    "EndpointIntegrity",
    "EtagDigest",
    "IntegrityError",
    "MiB",
    "RemoteLocation",
    "RemoteObject",
    "RenameTolerantOSUtils",
    "StoreError",
    "UploadCancelled",
    "at_current_path",
    "checksum_algorithm",
    "crt_available",
    "describe_error",
    "encryption_hiding_md5",
    "endpoint_integrity",
    "etag_is_md5",
    "is_aws_endpoint",
    "is_cancellation",
    "is_md5_etag",
    "make_s3_client",
    "make_transfer_config",
    "make_transfer_manager",
    "multipart_part_size",
    "normalize_etag",
    "parse_remote",
    "server_checksum",
    "use_crt",
]
