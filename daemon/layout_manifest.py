"""The checkpoint's names and its manifest (CONTRACT §4, §5): what a checkpoint directory
is called, and what ``manifest.json`` must say.

Pure: no file is opened here. Reading a checkpoint from disk (and checking its files
against the manifest) is :mod:`daemon.layout_verify`; writing one is
:mod:`daemon.layout_writer`. Standard library only (see :mod:`daemon.layout`).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "spot-checkpoint/1"
PARTIAL_SUFFIX = ".partial"
TMP_PREFIX = ".tmp-"
REASONS = ("periodic", "interrupt", "requested", "final")
STEP_DIGITS = 9
MAX_STEP = 10**STEP_DIGITS - 1

_STEP_DIR_RE = re.compile(r"^step-(\d{9})$")
_TMP_DIR_RE = re.compile(r"^\.tmp-step-(\d{9})-.+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# The most a manifest may weigh (about half a million files): a larger one, local or
# remote, is never read into memory, and so is never a checkpoint.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# NAME_MAX of ext4, xfs, btrfs and tmpfs; a file is written as ``<name>.partial`` first.
_NAME_MAX = 255
# No S3 key is longer, so no remote checkpoint can list a longer path.
_PATH_MAX = 1024


class ManifestError(ValueError):
    """A manifest (or the files it lists) does not match the format or the bytes."""


class UnsafePathError(ManifestError):
    """A listed file is reached through a symlink, or is not a regular file."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, path relative to the checkpoint directory."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of one checkpoint."""

    run_id: str
    step: int
    created_at: str
    reason: str
    files: tuple[FileEntry, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of all listed files (the manifest itself excluded)."""
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        """The manifest as written to disk and to object storage."""
        doc: dict[str, Any] = dict(self.extra)
        doc.update(
            {
                "format": MANIFEST_FORMAT,
                "run_id": self.run_id,
                "step": self.step,
                "created_at": self.created_at,
                "reason": self.reason,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            }
        )
        return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


def step_dir_name(step: int) -> str:
    """``step-000001200`` for step 1200."""
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step {step} is outside 0..{MAX_STEP}")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a complete checkpoint's directory name, else None."""
    m = _STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def parse_tmp_dir(name: str) -> int | None:
    """The step of a writer's ``.tmp-step-<9 digits>-<anything>`` directory, else None."""
    m = _TMP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


def utc_now_iso() -> str:
    """Now as ISO 8601 UTC with a ``Z``, second precision."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _show(path: str) -> str:
    # Paths come from manifests anyone may have written: keep log lines short.
    return repr(path if len(path) <= 80 else path[:60] + "..." + path[-12:])


def _safe_relpath(path: Any) -> str:
    # A manifest comes from disk or from a bucket: never let it name a file outside the
    # checkpoint directory, nor one this path could not be written as on any common Linux
    # filesystem. Only the canonical spelling is allowed (no empty or "." components), so
    # one path names one file: "a//b" and "a/b" may not both be listed.
    if not isinstance(path, str) or not path:
        raise ManifestError(f"file path {path!r} is not a non-empty string")
    if "\x00" in path or "\\" in path or path.startswith("/"):
        raise ManifestError(f"file path {_show(path)} is not a plain relative path")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ManifestError(f"file path {_show(path)} is not a plain relative path")
    try:
        encoded = [part.encode() for part in parts]
    except UnicodeEncodeError:
        raise ManifestError(f"file path {_show(path)} is not valid UTF-8") from None
    longest = max(len(part) for part in encoded)
    if longest + len(PARTIAL_SUFFIX) > _NAME_MAX:
        raise ManifestError(
            f"file path {_show(path)} has a name of {longest} bytes: too long for a file name "
            f"(at most {_NAME_MAX - len(PARTIAL_SUFFIX)})"
        )
    if len(path.encode()) > _PATH_MAX:
        raise ManifestError(f"file path {_show(path)} is too long (over {_PATH_MAX} bytes)")
    if path == MANIFEST_NAME or path.endswith(PARTIAL_SUFFIX):
        raise ManifestError(f"file path {_show(path)} uses a reserved name")
    return path


def _check_file_dir_conflicts(paths: Iterable[str]) -> None:
    """No listed path may also be a directory of another (``a`` and ``a/b``)."""
    files = set(paths)
    for path in files:
        parent, sep, _ = path.rpartition("/")
        while sep:
            if parent in files:
                raise ManifestError(
                    f"manifest lists {_show(parent)} as a file and as the directory of "
                    f"{_show(path)}"
                )
            parent, sep, _ = parent.rpartition("/")


def parse_manifest(raw: bytes | str, *, expect_step: int | None = None) -> Manifest:
    """Parse and validate a manifest document; raise ManifestError naming what is wrong."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    if doc.get("format") != MANIFEST_FORMAT:
        raise ManifestError(
            f"manifest format is {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}"
        )
    run_id, step, created_at, reason = (
        doc.get("run_id"),
        doc.get("step"),
        doc.get("created_at"),
        doc.get("reason"),
    )
    if not isinstance(run_id, str) or not run_id:
        raise ManifestError("manifest run_id is missing or not a string")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise ManifestError(f"manifest step {step!r} is not an integer in 0..{MAX_STEP}")
    if expect_step is not None and step != expect_step:
        raise ManifestError(
            f"manifest step {step} does not match its directory (step {expect_step})"
        )
    if not isinstance(created_at, str):
        raise ManifestError("manifest created_at is missing or not a string")
    if reason not in REASONS:
        raise ManifestError(f"manifest reason {reason!r} is not one of {', '.join(REASONS)}")
    files_raw = doc.get("files")
    if not isinstance(files_raw, list):
        raise ManifestError("manifest files is missing or not a list")
    files: list[FileEntry] = []
    seen: set[str] = set()
    for i, entry in enumerate(files_raw):
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest files[{i}] is not an object")
        path = _safe_relpath(entry.get("path"))
        size, sha = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"manifest files[{i}] ({path}) size {size!r} is not a size")
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise ManifestError(f"manifest files[{i}] ({path}) sha256 is not 64 lower-case hex")
        if path in seen:
            raise ManifestError(f"manifest lists {path} twice")
        seen.add(path)
        files.append(FileEntry(path, size, sha))
    _check_file_dir_conflicts(seen)
    known = {"format", "run_id", "step", "created_at", "reason", "files"}
    extra = {k: v for k, v in doc.items() if k not in known}
    return Manifest(run_id, step, created_at, reason, tuple(files), extra)
