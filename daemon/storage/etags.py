"""ETag maths: the ETag S3 gives an object of these bytes, computed while they are read.

An ETag is the MD5 of the bytes, or for a multipart upload the MD5 of the parts' MD5s
and ``-N``, with the part boundaries s3transfer uses (:func:`multipart_part_size`).
:class:`EtagDigest` computes it from the reads that send the bytes anyway
(:class:`DigestingReader`), so checking a stored object by its ETag costs no second read.

Which ETags may be compared with an MD5 at all (encryption, an endpoint's own
convention) is :mod:`daemon.storage.integrity`'s to say, not this module's.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from typing import IO

from boto3.s3.transfer import TransferConfig
from s3transfer.utils import ChunksizeAdjuster

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


class DigestingReader:
    """A file read to be sent, feeding an :class:`EtagDigest` (when there is one) with the
    bytes of each read at its offset; a part read again is hashed once (see
    :meth:`EtagDigest.feed`)."""

    def __init__(self, f: IO[bytes], digest: EtagDigest | None) -> None:
        self._f = f
        self._digest = digest
        self._pos = 0

    def read(self, amount: int | None = -1) -> bytes:
        data = self._f.read(-1 if amount is None else amount)
        if self._digest is not None and data:
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
