"""What the storage layers pass around: records of checkpoints, uploads and restores,
and the constants of the layout in storage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from daemon.layout import (
    Manifest,
)
from daemon.storage.global_commit import (
    CompleteSet,
)
from daemon.storage.locations import RemoteObject

log = structlog.get_logger(__name__)

T = TypeVar("T")


COMPLETE_NAME = "complete.json"


# complete.json is a few dozen bytes; anything near this is not one (MAX_MANIFEST_BYTES,
# from daemon.layout, bounds each manifest read the same way).
MAX_COMPLETE_BYTES = 1024 * 1024


CHECKPOINTS_DIR = "checkpoints"


_RUN_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


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
    is skipped and says so; ``etag_served``: the server's own answer);
    ``sha256_checked`` whether our own sha256 of the bytes sent equals the manifest's (if
    not, the commit is ``pending`` until
    :meth:`CheckpointStore.mark_verified`).
    """

    size: int
    etag: str | None
    sha256_checked: bool
    # ``etag`` is the one the server answered the upload with, having verified its
    # additional checksum (see EndpointIntegrity.verifies_checksums), not our MD5.
    etag_served: bool = False


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


def _too_large(url: str, size: int | None, limit: int) -> str:
    if size is None:
        return f"{url} has more bytes than it announced, over the limit of {limit}; not read"
    return f"{url} is {size} bytes, over the limit of {limit} bytes for this object; not read"


LEFTOVER_AGE_S = 3600.0
