"""The chaos run's invariant checker: the bucket read from outside the daemon (no tests).

After every event the checker reads the bucket with its own boto3 client (not the proxy,
not the daemon's code): every manifest's files exist with their size and sha256; the
newest committed step never goes down; retention never deletes one of the newest
``keep_remote`` committed checkpoints (and leaves exactly that many at the end); the
daemon's own listing returns exactly the committed steps; and, now and then, the
daemon's restore into a scratch dir installs the newest committed checkpoint, byte for
byte. What must not live here: the run itself (chaos_run.py, chaos_harness.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from chaos_schedule import BUCKET, PREFIX, RUN_ID

from daemon.storage.s3client import RemoteLocation, make_s3_client
from daemon.storage.store import LEFTOVER_AGE_S, CheckpointStore


class InvariantViolation(AssertionError):
    """An invariant of the bucket or of the run does not hold."""


@dataclass
class Snapshot:
    """The bucket as the checker saw it: committed manifests and uncommitted step prefixes."""

    committed: dict[int, dict[str, Any]] = field(default_factory=dict)
    verified: dict[int, bool] = field(default_factory=dict)
    uncommitted: set[int] = field(default_factory=set)
    # Uncommitted steps with an object written within the last LEFTOVER_AGE_S: retention
    # leaves those alone (an upload in flight, another node's or instance's).
    recent: set[int] = field(default_factory=set)
    objects: int = 0

    @property
    def newest(self) -> int | None:
        return max(self.committed, default=None)


class Checker:
    """Invariants over the bucket, from its own client; independent of the daemon's code
    except where the daemon's behaviour is what is checked (its listing, its restore)."""

    def __init__(self, endpoint_url: str, keep: int, scratch: Path) -> None:
        self.s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
        self.prefix = f"{PREFIX}/{RUN_ID}/checkpoints/"
        self.keep = keep
        self.scratch = scratch
        self.store = CheckpointStore(
            make_s3_client(endpoint_url, "us-east-1", 8), RemoteLocation(BUCKET, PREFIX), RUN_ID
        )
        self._sha: dict[tuple[str, str, int], str] = {}
        self.seen: set[int] = set()
        self.high: int | None = None
        self.checks = 0
        self.restore_checks = 0
        self.max_committed = 0
        self.over_count: list[dict[str, Any]] = []

    def _list(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=self.prefix)
        for page in pages:
            for o in page.get("Contents", []):
                found[o["Key"]] = dict(o)
        return found

    def _exists(self, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=BUCKET, Key=key)
        except ClientError:
            return False
        return True

    def _sha256(self, key: str, etag: str, size: int) -> str | None:
        cached = self._sha.get((key, etag, size))
        if cached is not None:
            return cached
        try:
            body = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except ClientError:
            return None
        except BotoCoreError as exc:  # the stored bytes fail the checksum stored with them
            return f"unreadable ({exc})"
        digest = hashlib.sha256(body).hexdigest()
        if len(body) == size:
            self._sha[(key, etag, size)] = digest
        return digest

    def snapshot(self) -> Snapshot:
        """Read every manifest and hash every file it lists; raise on a broken commit."""
        objs = self._list()
        snap = Snapshot(objects=len(objs))
        by_step: dict[int, dict[str, dict[str, Any]]] = {}
        for key, obj in objs.items():
            step_dir, _, rel = key[len(self.prefix) :].partition("/")
            m = re.fullmatch(r"step-(\d{9})", step_dir)
            if m is None or not rel:
                raise InvariantViolation(f"unexpected object {key} under the checkpoints prefix")
            by_step.setdefault(int(m.group(1)), {})[rel] = obj
        for step, files in sorted(by_step.items()):
            mkey = f"{self.prefix}step-{step:09d}/manifest.json"
            if "manifest.json" not in files:
                snap.uncommitted.add(step)
                cutoff = time.time() - LEFTOVER_AGE_S
                if any(o["LastModified"].timestamp() >= cutoff for o in files.values()):
                    snap.recent.add(step)
                continue
            try:
                resp = self.s3.get_object(Bucket=BUCKET, Key=mkey)
                raw = resp["Body"].read()
            except ClientError:
                snap.uncommitted.add(step)  # withdrawn (retention) since the listing
                continue
            except BotoCoreError as exc:
                raise InvariantViolation(f"{mkey} cannot be read back: {exc}") from None
            try:
                doc = json.loads(raw)
            except ValueError as exc:
                raise InvariantViolation(f"{mkey} is not JSON: {exc}") from None
            if doc.get("step") != step or doc.get("run_id") != RUN_ID:
                raise InvariantViolation(
                    f"{mkey} names step {doc.get('step')} of run {doc.get('run_id')}"
                )
            withdrawn = False
            for f in doc["files"]:
                key = f"{self.prefix}step-{step:09d}/{f['path']}"
                entry = files.get(f["path"])
                problem = None
                if entry is None:
                    problem = "missing"
                elif entry["Size"] != f["size"]:
                    problem = f"{entry['Size']} bytes, manifest says {f['size']}"
                else:
                    digest = self._sha256(key, entry["ETag"], entry["Size"])
                    if digest is None:
                        problem = "vanished while read"
                    elif digest != f["sha256"]:
                        problem = f"sha256 {digest[:12]}..., manifest says {f['sha256'][:12]}..."
                if problem is not None:
                    if not self._exists(mkey):
                        withdrawn = True  # retention: the manifest goes first, then the files
                        break
                    raise InvariantViolation(f"committed step {step}: {key} {problem}")
            if withdrawn:
                snap.uncommitted.add(step)
                continue
            snap.committed[step] = doc
            snap.verified[step] = resp.get("Metadata", {}).get("verified", "sha256") == "sha256"
        return snap

    def check(self, label: str, final: bool = False) -> Snapshot:
        """Every invariant that must hold at any moment (and, ``final``, at the end)."""
        self.checks += 1
        snap = self.snapshot()
        committed = set(snap.committed)
        # The newest committed step only grows.
        if self.high is not None and (snap.newest is None or snap.newest < self.high):
            raise InvariantViolation(
                f"{label}: newest committed step went from {self.high} to {snap.newest}"
            )
        # Retention never deletes one of the newest `keep` checkpoints ever committed.
        everything = self.seen | committed
        top = sorted(everything)[-self.keep :]
        lost = [s for s in top if s not in committed]
        if lost:
            raise InvariantViolation(
                f"{label}: committed step(s) {lost} are gone, though among the newest "
                f"{self.keep} ever committed ({sorted(everything)[-self.keep - 2 :]})"
            )
        self.seen = everything
        self.high = snap.newest if snap.newest is not None else self.high
        self.max_committed = max(self.max_committed, len(committed))
        pending = sum(1 for s in committed if not snap.verified[s])
        if len(committed) > self.keep + pending + 1:
            # Not a violation: a kill between a commit and its retention pass leaves extras
            # until the next verified commit. Reported, so a trend would show.
            self.over_count.append({"label": label, "committed": sorted(committed)})
        self._check_listing(label, snap)
        if final:
            if len(committed) != min(self.keep, len(self.seen)):
                raise InvariantViolation(
                    f"{label}: {len(committed)} committed checkpoints at the end "
                    f"({sorted(committed)}), retention keeps {self.keep}"
                )
            oldest = min(committed, default=0)
            stale = sorted(s for s in snap.uncommitted - snap.recent if s < oldest)
            if stale:
                raise InvariantViolation(
                    f"{label}: uncommitted leftovers {stale} older than the oldest kept {oldest}"
                )
        return snap

    def _check_listing(self, label: str, snap: Snapshot) -> None:
        """The daemon's listing (what restore walks) returns the committed steps only."""
        for _attempt in range(3):
            listed = {c.step for c in self.store.list_committed()}
            if listed == set(snap.committed):
                return
            later = self.snapshot()  # something committed or retired meanwhile: look again
            extra = listed - set(snap.committed) - set(later.committed)
            if extra:
                raise InvariantViolation(
                    f"{label}: the daemon's listing returns step(s) {sorted(extra)}, which are "
                    "not committed (no valid manifest, or a file missing or different)"
                )
            missed = (set(snap.committed) & set(later.committed)) - listed
            if not missed:
                return
            snap = later
        raise InvariantViolation(
            f"{label}: the daemon's listing skips committed step(s) {sorted(missed)}"
        )

    def check_restore(self, label: str) -> int | None:
        """The daemon's restore into an empty dir installs the newest committed checkpoint."""
        self.restore_checks += 1
        before = self.snapshot()
        dest = self.scratch / f"restore-{self.restore_checks}"
        try:
            result = self.store.restore_newest(dest)
            after = self.snapshot()
            if result is None:
                if before.committed:
                    raise InvariantViolation(f"{label}: restore found nothing")
                return None
            doc = after.committed.get(result.step) or before.committed.get(result.step)
            if doc is None:
                raise InvariantViolation(
                    f"{label}: restore installed step {result.step}, which is not committed"
                )
            if before.newest is not None and result.step < before.newest:
                raise InvariantViolation(
                    f"{label}: restore installed step {result.step}, the newest committed "
                    f"is {before.newest}"
                )
            names = {p.name for p in result.path.iterdir()} - {"manifest.json"}
            if names != {f["path"] for f in doc["files"]}:
                raise InvariantViolation(f"{label}: restored files {sorted(names)} differ")
            for f in doc["files"]:
                data = (result.path / f["path"]).read_bytes()
                if len(data) != f["size"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
                    raise InvariantViolation(f"{label}: restored {f['path']} differs")
            return result.step
        finally:
            shutil.rmtree(dest, ignore_errors=True)
