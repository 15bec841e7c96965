"""Where checkpoints live: remote URLs parsed into a bucket and a key prefix, and a
listed object.

``s3://`` here (:func:`parse_remote`); ``gs://`` and ``az://`` too
(:func:`parse_blob_remote`), and :func:`parse_any_remote` for any of them. Parsing only:
nothing here talks to a service.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Lenient on purpose: legacy buckets may hold upper case and underscores, and
# S3-compatible servers are laxer than AWS; S3 itself has the last word.
BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,254}$")

BLOB_SCHEMES = ("gs", "az")
# Checked by daemon.config_values._remote at load time too, from here (one copy).
# GCS: 3-63 characters (222 with dots) of a-z 0-9 - _ ., starting and ending alphanumeric.
GCS_BUCKET_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{1,220})[a-z0-9]$")
# Azure: 3-63 of a-z 0-9 -, starting with a letter or digit, no "--", not ending in "-".
AZURE_CONTAINER_RE = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


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
    if not BUCKET_RE.match(bucket):
        raise ValueError(f"remote {value!r}: {bucket!r} is not a valid bucket name")
    return RemoteLocation(bucket, _checked_prefix(value, prefix, "an S3 key prefix"))


def _checked_prefix(value: str, prefix: str, what: str) -> str:
    """``prefix`` of the remote ``value`` without its outer slashes; ValueError naming
    ``value`` when it holds characters not allowed in ``what`` or an empty path segment."""
    if any(c in value for c in "?#") or any(ch.isspace() for ch in value):
        raise ValueError(f"remote {value!r} contains characters not allowed in {what}")
    prefix = prefix.strip("/")
    if "//" in prefix:
        raise ValueError(f"remote {value!r} has an empty path segment in its prefix")
    return prefix


@dataclass(frozen=True)
class BlobLocation(RemoteLocation):
    """A bucket (GCS) or container (Azure) and a key prefix, named by its URL scheme."""

    scheme: str = "gs"

    def url(self, key: str = "") -> str:
        """``gs://bucket/key`` or ``az://container/key`` for messages."""
        return f"{self.scheme}://{self.bucket}/{key}"


def parse_blob_remote(value: str) -> BlobLocation:
    """Parse ``gs://bucket[/prefix]`` or ``az://container[/prefix]``; ValueError naming the
    value when it is not one."""
    m = re.match(r"^(gs|az)://([^/]*)(?:/(.*))?$", value or "", re.DOTALL)
    if not m or not m[2]:
        raise ValueError(f"remote {value!r} is not gs://bucket[/prefix] or az://container[/prefix]")
    scheme, bucket, prefix = m[1], m[2], m[3] or ""
    if scheme == "gs" and (
        not GCS_BUCKET_RE.match(bucket)
        or (len(bucket) > 63 and "." not in bucket)
        or any(len(part) > 63 for part in bucket.split("."))
    ):
        raise ValueError(f"remote {value!r}: {bucket!r} is not a valid GCS bucket name")
    if scheme == "az" and not AZURE_CONTAINER_RE.match(bucket):
        raise ValueError(f"remote {value!r}: {bucket!r} is not a valid Azure container name")
    return BlobLocation(bucket, _checked_prefix(value, prefix, "a key prefix"), scheme)


def parse_any_remote(value: str) -> RemoteLocation:
    """``s3://`` (:func:`parse_remote`), ``gs://`` or ``az://``."""
    if isinstance(value, str) and is_blob_remote(value):
        return parse_blob_remote(value)
    return parse_remote(value)


def is_blob_remote(value: str) -> bool:
    """Whether ``checkpoints.remote`` names GCS or Azure (not S3)."""
    return value.startswith(tuple(f"{s}://" for s in BLOB_SCHEMES))
