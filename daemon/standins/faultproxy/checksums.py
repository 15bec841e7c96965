"""Checking a request body against its additional checksum header, as S3 on AWS does.

AWS S3 computes the checksum a PutObject or UploadPart names in its header
(``x-amz-checksum-crc32``, ``-crc32c``, ``-sha1``, ``-sha256``) over the body it received
and refuses the request with ``400 BadDigest`` when they differ: nothing is stored. moto
and s3rver keep whatever arrives. With ``verify_checksums`` the proxy does what AWS does,
for the stand-in behind it: :class:`BodyChecksum` hashes the body as it is relayed (after
any ``corrupt`` rule: a flip on the way is what the check is for) and the body's last
byte is held back until the verdict. A mismatch closes the upstream connection before
that byte (the server gets a request cut short, and stores nothing) and the client gets
S3's ``BadDigest``.

Not modelled: bodies in ``aws-chunked`` encoding with a trailing checksum (botocore sends
those over https only; the stand-ins are plain http), a checksum the proxy cannot compute
(CRC32C without ``awscrt``, CRC64NVME), which pass unverified, and the checksum of a
whole multipart object at CompleteMultipartUpload.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import zlib
from collections.abc import Callable
from typing import Any

# S3's wording for the error (the algorithm's name goes first).
BAD_DIGEST_CODE = "BadDigest"
BAD_DIGEST_MESSAGE = "The {name} you specified did not match the calculated checksum."


class _Crc:
    """A CRC with hashlib's ``update``/``digest`` (4 bytes, big-endian, as S3 encodes it)."""

    def __init__(self, fn: Callable[[Any, int], int]) -> None:
        self._fn = fn
        self.value = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.value = self._fn(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _hashers() -> dict[str, tuple[str, Callable[[], Any]]]:
    found: dict[str, tuple[str, Callable[[], Any]]] = {
        "x-amz-checksum-crc32": ("CRC32", lambda: _Crc(zlib.crc32)),
        "x-amz-checksum-sha1": ("SHA1", lambda: hashlib.sha1(usedforsecurity=False)),
        "x-amz-checksum-sha256": ("SHA256", hashlib.sha256),
    }
    if importlib.util.find_spec("awscrt") is not None:
        crc32c = importlib.import_module("awscrt.checksums").crc32c
        found["x-amz-checksum-crc32c"] = ("CRC32C", lambda: _Crc(crc32c))
    return found


_HASHERS = _hashers()


class BodyChecksum:
    """The additional checksum a request names, computed over its body as relayed."""

    def __init__(self, header: str, expected: str) -> None:
        self.name, make = _HASHERS[header]
        self._expected = expected.strip()
        self._h = make()

    @classmethod
    def of(cls, headers: list[tuple[str, str]]) -> BodyChecksum | None:
        """The check of the first checksum header the proxy can compute; None if none."""
        for key, value in headers:
            if key.lower() in _HASHERS:
                return cls(key.lower(), value)
        return None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def matches(self) -> bool:
        return base64.b64encode(self._h.digest()).decode("ascii") == self._expected

    def message(self) -> str:
        return BAD_DIGEST_MESSAGE.format(name=self.name)


class BadDigest(Exception):
    """The body does not match its checksum header: answer S3's ``400 BadDigest``."""

    def __init__(self, check: BodyChecksum) -> None:
        super().__init__(check.message())
        self.check = check
