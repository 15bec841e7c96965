"""The chaos run: one training run, many injected faults, nothing lost.

One real training run (the reference trainer on CPU, under real ``spot-supervisor run``
processes, against moto's S3 server through the fault-injecting proxy and the metadata
emulator, all on loopback) suffers a seeded schedule of events at random times:

* ``notice``: a spot notice with a deadline 10-120 s away; the supervisor must commit
  and exit 0; the harness then boots a new one, on a new instance (empty local dir) or
  on the same one;
* ``kill_trainer_mid_save``: SIGKILL of the trainer while its ``.tmp-step-*`` dir exists;
  the supervisor restarts it;
* ``kill_supervisor_mid_upload`` / ``kill_supervisor_mid_commit``: SIGKILL of the
  supervisor (and, as systemd's cgroup kill would, of its trainer) while the proxy
  holds a PUT of a data object (throttled) or of a ``manifest.json`` (stalled) in
  flight; the harness restarts it on the same instance, as ``Restart=on-failure`` would;
* ``rebalance``: a rebalance recommendation (an early checkpoint, training goes on);
* ``s3_*``: a proxy fault: a 503 SlowDown burst, 500s, connection resets, stalls, a
  request body corrupted in flight.

After every event an invariant checker reads the bucket directly (its own boto3 client,
not the proxy, not the daemon's code): every manifest's files exist with their size and
sha256; the newest committed step never goes down; retention never deletes one of the
newest ``keep_remote`` committed checkpoints (and leaves exactly that many at the end);
the daemon's own listing returns exactly the committed steps, never a step prefix
without a valid manifest; and now and then the daemon's restore, run into a scratch
dir, installs the newest committed checkpoint, byte for byte. At the end the run's
``final_params_sha256`` must equal that of an uninterrupted run with the same flags.

    python tests/chaos_run.py [--events N] [--seed S] [--short] [--out FILE]

Exit status 0 when every invariant held, the hashes are equal and all the events were
applied; 1 otherwise (the JSON report says why).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
from botocore.exceptions import BotoCoreError, ClientError  # noqa: E402

from daemon.standins import FAKE_AWS_ENV, LocalS3, start_local_s3  # noqa: E402
from daemon.standins.demo import SupervisorProcess, trainer_command, write_config  # noqa: E402
from daemon.standins.emulator import MetadataEmulator  # noqa: E402
from daemon.standins.faultproxy import FaultProxy, Rule  # noqa: E402
from daemon.storage.s3client import RemoteLocation, make_s3_client  # noqa: E402
from daemon.storage.store import LEFTOVER_AGE_S, CheckpointStore  # noqa: E402

RUN_ID = "chaos-run"
BUCKET = "chaos"
PREFIX = "runs"
MiB = 1024 * 1024

# Requests of the run's checkpoints (PUT, GET, list, delete: the prefix is in the target).
CKPT_RE = r"checkpoints"
# A PUT of the large data file of a checkpoint (the ballast), and of a manifest.
DATA_PUT_RE = r"/step-\d{9}/ballast\.pt"
MANIFEST_PUT_RE = r"/step-\d{9}/manifest\.json"
# A trainer's own temporary checkpoint dir: .tmp-step-<9 digits>-<writer pid>-...
_WRITER_TMP_RE = re.compile(r"^\.tmp-step-\d{9}-(\d+)-")
_STEP_LINE_RE = re.compile(r"^step=(\d+) loss=")
_RESUMED_RE = re.compile(r"^resumed step=(\d+)")

KINDS = (
    "notice",
    "kill_trainer_mid_save",
    "kill_supervisor_mid_upload",
    "kill_supervisor_mid_commit",
    "rebalance",
    "s3_503_burst",
    "s3_500",
    "s3_reset",
    "s3_stall",
    "s3_corrupt",
)
WEIGHTS = {
    "notice": 16,
    "kill_trainer_mid_save": 14,
    "kill_supervisor_mid_upload": 11,
    "kill_supervisor_mid_commit": 11,
    "rebalance": 12,
    "s3_503_burst": 8,
    "s3_500": 6,
    "s3_reset": 8,
    "s3_stall": 7,
    "s3_corrupt": 7,
}


class InvariantViolation(AssertionError):
    """An invariant of the bucket or of the run does not hold."""


@dataclass(frozen=True)
class Settings:
    """What the run does; ``--short`` and the defaults differ only here."""

    events: int
    seed: int
    steps: int
    save_every: int
    step_seconds: float
    state_mb: int
    keep_remote: int = 3
    restore_check_every: int = 4
    gap: tuple[float, float] = (0.2, 1.5)
    max_seconds: float = 2400.0


# Steps enough that training outlasts the events (each lets it run for a second or two).
FULL = Settings(events=60, seed=7, steps=1500, save_every=10, step_seconds=0.1, state_mb=8)
SHORT = Settings(
    events=10,
    seed=11,
    steps=300,
    save_every=8,
    step_seconds=0.08,
    state_mb=2,
    restore_check_every=3,
    gap=(0.2, 0.8),
    max_seconds=600.0,
)


@dataclass(frozen=True)
class Planned:
    """One event of the seeded schedule: its kind, the pause before it, its parameters."""

    index: int
    kind: str
    gap_s: float
    params: dict[str, Any]


def schedule(seed: int) -> Iterator[Planned]:
    """The seeded, endless event stream: every kind once (shuffled), then weighted draws."""
    rng = random.Random(seed)
    first = list(KINDS)
    rng.shuffle(first)
    kinds = list(WEIGHTS)
    weights = [WEIGHTS[k] for k in kinds]
    i = 0
    while True:
        kind = first[i] if i < len(first) else rng.choices(kinds, weights)[0]
        params: dict[str, Any] = {}
        if kind == "notice":
            params = {"deadline_s": rng.randint(10, 120), "new_instance": rng.random() < 0.5}
        elif kind == "s3_503_burst":
            params = {"count": rng.randint(3, 8)}
        elif kind == "s3_500":
            params = {"count": rng.randint(2, 4)}
        elif kind == "s3_reset":
            params = {
                "phase": rng.choice(["request", "response"]),
                "after_bytes": rng.randint(0, 64 * 1024),
                "count": rng.randint(1, 2),
            }
        elif kind == "s3_stall":
            params = {"seconds": round(rng.uniform(1.0, 5.0), 2), "count": rng.randint(1, 2)}
        elif kind == "s3_corrupt":
            params = {"fraction": rng.random(), "nbytes": rng.randint(1, 16)}
        yield Planned(i, kind, rng.random(), params)
        i += 1


# -- the invariant checker ---------------------------------------------------------------


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


# -- the run ---------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def _wait_until(pred: Callable[[], bool], timeout: float, every: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return pred()


def _lines(sup: SupervisorProcess) -> list[str]:
    return list(sup.lines)


class Chaos:
    """One chaos run; :meth:`run` returns the report (also written as JSON)."""

    def __init__(self, settings: Settings, work: Path, echo: bool = False) -> None:
        self.s = settings
        self.work = work
        self.echo = echo
        self.t0 = time.monotonic()
        self.sups: list[SupervisorProcess] = []
        self.trainer_pids: set[int] = set()
        self.instance = 0
        self.boots = 0
        self.new_instances = 0
        self.applied: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.records: list[dict[str, Any]] = []
        self.unexpected_exits: list[dict[str, Any]] = []
        self.s3_rules: list[Rule] = []
        self.finished = False
        self.rng = random.Random(settings.seed * 7919 + 1)
        self.flags = trainer_command(
            settings.steps, settings.save_every, settings.step_seconds, settings.state_mb
        )[3:]

    # -- plumbing -------------------------------------------------------------------

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    @property
    def sup(self) -> SupervisorProcess:
        return self.sups[-1]

    @property
    def local_dir(self) -> Path:
        return self.work / f"instance-{self.instance}" / "checkpoints"

    def boot(self, new_instance: bool) -> None:
        if new_instance or self.instance == 0:
            self.instance += 1
            self.new_instances += 1
        d = self.work / f"instance-{self.instance}"
        d.mkdir(parents=True, exist_ok=True)
        cfg = write_config(
            d / "config.toml",
            run_id=RUN_ID,
            command=trainer_command(
                self.s.steps, self.s.save_every, self.s.step_seconds, self.s.state_mb
            ),
            local_dir=d / "checkpoints",
            remote=f"s3://{BUCKET}/{PREFIX}",
            endpoint_url=self.proxy.url,
            imds_url=self.emulator.url,
            runtime_dir=d / "run",
            poll_interval=0.2,
            extra={
                "checkpoints": {"keep_remote": self.s.keep_remote},
                # A crash budget no chaos run exhausts, and a 1 s backoff between restarts.
                "daemon": {"max_restarts": 1000, "restart_window": 1.0, "rescan_interval": 1},
            },
        )
        env = {**os.environ, **FAKE_AWS_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        self.sups.append(SupervisorProcess(cfg, env, echo=self.echo).start())
        self.boots += 1

    def trainer_pid(self, sup: SupervisorProcess | None = None) -> int | None:
        sup = sup or self.sup
        started = sup.find("child_started")
        if not started:
            return None
        pid = int(started[-1]["pid"])
        self.trainer_pids.add(pid)
        return pid if _alive(pid) else None

    def progressing(self) -> bool:
        """The newest trainer has started and printed a step since."""
        lines = _lines(self.sup)
        idx = max((i for i, ln in enumerate(lines) if '"child_started"' in ln), default=-1)
        return idx >= 0 and any(_STEP_LINE_RE.match(ln) for ln in lines[idx + 1 :])

    def current_step(self) -> int:
        for ln in reversed(_lines(self.sup)):
            m = _STEP_LINE_RE.match(ln) or _RESUMED_RE.match(ln)
            if m:
                return int(m.group(1))
        return 0

    def kill_trainer_group(self, pid: int | None) -> None:
        """What systemd's cgroup kill does to a dead supervisor's trainer."""
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if not _wait_until(lambda: not _alive(pid), 10):
            raise InvariantViolation(f"trainer {pid} survived SIGKILL")

    def exited(self) -> bool:
        """The current supervisor has exited: done, or restarted as systemd would."""
        proc = self.sup.proc
        assert proc is not None
        if proc.poll() is None:
            return False
        code = self.sup.wait_exit(10)
        if self.sup.find("run_completed") and code == 0:
            self.finished = True
            return True
        if code == 2:
            raise InvariantViolation("supervisor exited 2 (bad configuration)")
        last = [e.get("event") for e in self.sup.events[-5:]]
        self.unexpected_exits.append({"code": code, "last_events": last})
        self.say(f"supervisor exited {code} on its own ({last}); restarting it")
        self.kill_trainer_group(self.trainer_pid())
        self.boot(new_instance=False)
        return True

    def clear_s3_faults(self) -> None:
        for rule in self.s3_rules:
            self.proxy.remove(rule)
        self.s3_rules.clear()

    # -- events -----------------------------------------------------------------------

    def ev_notice(self, p: Planned) -> dict[str, Any]:
        lead = int(p.params["deadline_s"])
        sup = self.sup
        at = self.emulator.set_notice(
            "terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=lead)
        )
        code = sup.wait_exit(lead + 90)
        self.emulator.clear_notice()
        pid = self.trainer_pid(sup)
        if pid is not None:
            raise InvariantViolation(f"trainer {pid} still running after the supervisor exited")
        if code != 0:
            raise InvariantViolation(f"supervisor exited {code} after a notice, not 0")
        done = sup.find("emergency_committed")
        fields = (done or sup.find("emergency_not_committed") or [{}])[0]
        outcome = "committed" if done else "not_committed"
        if sup.find("run_completed"):
            self.finished = True
            outcome = "run_completed_first"
        self.outcomes[f"notice_{outcome}"] += 1
        if not self.finished:
            self.boot(bool(p.params["new_instance"]))
        return {
            "deadline_s": lead,
            "notice_time": at.isoformat(),
            "outcome": outcome,
            "committed_step": fields.get("committed_step"),
            "seconds_before_deadline": fields.get("seconds_before_deadline"),
            "new_instance": bool(p.params["new_instance"]),
        }

    def ev_kill_trainer_mid_save(self, p: Planned) -> dict[str, Any] | None:
        pid = self.trainer_pid()
        if pid is None:
            return None
        local = self.local_dir
        found: str | None = None
        end = time.monotonic() + 30
        while found is None and time.monotonic() < end and _alive(pid):
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(local):
                    m = _WRITER_TMP_RE.match(name)
                    if m and int(m.group(1)) == pid:
                        found = name
                        break
            if found is None:
                time.sleep(0.002)
        if found is None:
            return None
        os.kill(pid, signal.SIGKILL)
        if not _wait_until(lambda: not _alive(pid), 10):
            raise InvariantViolation(f"trainer {pid} survived SIGKILL")
        mid_save = (local / found).exists()
        self.outcomes["trainer_killed_mid_save" if mid_save else "trainer_save_won_race"] += 1
        restarted = _wait_until(lambda: self.trainer_pid() not in (None, pid), 30, 0.05)
        if not restarted and not self.exited():
            raise InvariantViolation(f"the supervisor did not restart the trainer killed ({pid})")
        return {"pid": pid, "tmp_dir": found, "mid_save": mid_save, "restarted": restarted}

    def _kill_supervisor_during(self, rule: Rule, what: str) -> dict[str, Any] | None:
        armed = time.monotonic()
        sup = self.sup
        proc = sup.proc
        assert proc is not None
        fired = _wait_until(lambda: rule.applied > 0 or proc.poll() is not None, 45, 0.005)
        if not fired or rule.applied == 0:
            self.proxy.remove(rule)
            return None
        time.sleep(0.05)  # well inside the throttled body or the stall
        kind = rule.kind.value
        done = [r for r in self.proxy.records(settle=0) if r.started >= armed and kind in r.faults]
        if done:  # it finished before we could act: no window
            self.proxy.remove(rule)
            return None
        pid = self.trainer_pid(sup)
        proc.kill()
        self.kill_trainer_group(pid)
        code = sup.wait_exit(10)
        self.proxy.remove(rule)
        self.proxy.wait_idle(10)
        hit = [r for r in self.proxy.records(settle=0) if r.started >= armed and kind in r.faults]
        # A throttled body still in the socket buffers may outlive the client for a while.
        target = hit[0].target if hit else f"PUT {rule.path} (still being relayed)"
        self.outcomes[f"supervisor_killed_mid_{what}"] += 1
        time.sleep(0.5)  # systemd's RestartSec, shortened
        self.boot(new_instance=False)
        return {"request": target, "supervisor_code": code, "trainer_pid": pid}

    def ev_kill_supervisor_mid_upload(self, p: Planned) -> dict[str, Any] | None:
        # 256 KiB/s: the ballast takes seconds to go up; the kill comes within 0.1 s.
        rule = self.proxy.throttle(256 * 1024, "request", method="PUT", path=DATA_PUT_RE, count=1)
        return self._kill_supervisor_during(rule, "upload")

    def ev_kill_supervisor_mid_commit(self, p: Planned) -> dict[str, Any] | None:
        # The manifest reaches the server; its answer is held: the commit is in flight.
        rule = self.proxy.stall(5.0, method="PUT", path=MANIFEST_PUT_RE, count=1)
        return self._kill_supervisor_during(rule, "commit")

    def ev_rebalance(self, p: Planned) -> dict[str, Any] | None:
        before = len(self.sup.find("early_checkpoint_requested"))
        self.emulator.set_rebalance()
        try:
            ok = _wait_until(
                lambda: len(self.sup.find("early_checkpoint_requested")) > before, 20, 0.05
            )
        finally:
            self.emulator.clear_rebalance()
        self.outcomes["rebalance_acted_on" if ok else "rebalance_not_seen"] += 1
        return {"early_checkpoint_requested": ok}

    def _arm(self, rule: Rule) -> dict[str, Any]:
        self.s3_rules.append(rule)
        fired = _wait_until(lambda: rule.applied > 0, 20, 0.02)
        self.outcomes["s3_fault_fired" if fired else "s3_fault_not_fired"] += 1
        return {"rule": {k: v for k, v in rule.to_dict().items() if v not in (None, 0)}}

    def ev_s3_503_burst(self, p: Planned) -> dict[str, Any]:
        self.clear_s3_faults()
        return self._arm(self.proxy.error(503, "SlowDown", path=CKPT_RE, count=p.params["count"]))

    def ev_s3_500(self, p: Planned) -> dict[str, Any]:
        self.clear_s3_faults()
        return self._arm(
            self.proxy.error(500, "InternalError", path=CKPT_RE, count=p.params["count"])
        )

    def ev_s3_reset(self, p: Planned) -> dict[str, Any]:
        self.clear_s3_faults()
        rule = self.proxy.reset(
            p.params["phase"], p.params["after_bytes"], path=CKPT_RE, count=p.params["count"]
        )
        return self._arm(rule)

    def ev_s3_stall(self, p: Planned) -> dict[str, Any]:
        self.clear_s3_faults()
        rule = self.proxy.stall(p.params["seconds"], path=CKPT_RE, count=p.params["count"])
        return self._arm(rule)

    def ev_s3_corrupt(self, p: Planned) -> dict[str, Any]:
        self.clear_s3_faults()
        size = self.s.state_mb * MiB
        offset = int(p.params["fraction"] * max(size - 64, 1))
        rule = self.proxy.corrupt(
            "request", offset, p.params["nbytes"], method="PUT", path=DATA_PUT_RE, count=1
        )
        return self._arm(rule)

    # -- the whole run -----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        s = self.s
        self.work.mkdir(parents=True, exist_ok=True)
        self.say(
            f"chaos run: seed {s.seed}, {s.events} events, trainer {' '.join(self.flags)}, "
            f"work dir {self.work}"
        )
        ref_dir = self.work / "reference"
        ref_out = (self.work / "reference.out").open("w")
        reference = subprocess.Popen(
            [
                *trainer_command(s.steps, s.save_every, s.step_seconds, s.state_mb),
                "--checkpoint-dir",
                str(ref_dir),
            ],
            stdout=ref_out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.s3: LocalS3 = start_local_s3()
        self.proxy = FaultProxy(self.s3.endpoint_url, seed=s.seed).start()
        self.emulator = MetadataEmulator().start()
        report: dict[str, Any] = {}
        violation: str | None = None
        checker = Checker(self.s3.endpoint_url, s.keep_remote, self.work / "scratch")
        try:
            checker.s3.create_bucket(Bucket=BUCKET)
            self.boot(new_instance=True)
            try:
                self._events(checker)
                self._finish(checker)
            except (InvariantViolation, AssertionError) as exc:
                violation = str(exc)
                self.say(f"VIOLATION: {violation}")
            # The uninterrupted run, with the same flags.
            try:
                reference.wait(timeout=max(60.0, s.steps * s.step_seconds * 4))
            except subprocess.TimeoutExpired:
                reference.kill()
                reference.wait()
            ref_out.close()
            ref_hash = _final_hash((self.work / "reference.out").read_text().splitlines())
            final_hash = None
            for sup in reversed(self.sups):
                final_hash = _final_hash(_lines(sup))
                if final_hash:
                    break
            report = self._report(checker, final_hash, ref_hash, violation)
        finally:
            self._cleanup(reference)
        return report

    def _events(self, checker: Checker) -> None:
        s = self.s
        deadline = self.t0 + s.max_seconds
        stream = schedule(s.seed)
        handlers: dict[str, Callable[[Planned], dict[str, Any] | None]] = {
            k: getattr(self, f"ev_{k}") for k in KINDS
        }
        tried = 0
        while sum(self.applied.values()) < s.events and tried < 3 * s.events:
            if time.monotonic() > deadline:
                raise InvariantViolation(f"the run took more than {s.max_seconds:.0f} s")
            p = next(stream)
            tried += 1
            # Every kind but the S3 faults acts on a trainer that is running.
            if not _wait_until(lambda: self.progressing() or self.exited(), 120, 0.05):
                raise InvariantViolation("the trainer never got going after a boot")
            if self.finished:
                break
            if not self.progressing():
                continue  # a supervisor was restarted meanwhile: draw again once it runs
            # Pause: drawn from the seed, shortened when the steps left run short of events.
            lo, hi = s.gap
            gap = lo + p.gap_s * (hi - lo)
            left_events = s.events - sum(self.applied.values())
            if s.steps - self.current_step() < 12 * left_events:
                gap = 0.05
            time.sleep(gap)
            if self.exited():
                if self.finished:
                    break
                continue
            t = time.monotonic() - self.t0
            rec = handlers[p.kind](p)
            if rec is None:
                self.skipped[p.kind] += 1
                self.say(f"#{p.index:03d} {p.kind}: no window, skipped")
                continue
            self.applied[p.kind] += 1
            n = sum(self.applied.values())
            checked = checker.check(f"after event {n} ({p.kind})")
            restored = None
            if n % s.restore_check_every == 0:
                restored = checker.check_restore(f"after event {n} ({p.kind})")
            self.records.append(
                {"n": n, "kind": p.kind, "t": round(t, 2), **rec, "newest": checked.newest}
            )
            extra = f", restore check: step {restored}" if restored is not None else ""
            self.say(
                f"event {n:3d} {p.kind}: {_brief(rec)}; committed {sorted(checked.committed)}"
                f"{extra}"
            )

    def _finish(self, checker: Checker) -> None:
        """No more faults: let training complete, then the end-of-run checks."""
        self.clear_s3_faults()
        self.proxy.clear()
        self.emulator.clear_notice()
        self.emulator.clear_rebalance()
        left = self.s.steps * (self.s.step_seconds + 0.1) + 300
        end = time.monotonic() + left
        while not self.finished:
            if time.monotonic() > end:
                raise InvariantViolation("the run did not complete after the last event")
            if not self.exited():
                time.sleep(0.2)
        self.say(f"run completed at step {self.sup.find('run_completed')[0]['step']}")
        checker.check("at the end", final=True)
        checker.check_restore("at the end")
        # One more boot: complete.json stops it before any training.
        self.boot(new_instance=True)
        code = self.sup.wait_exit(60)
        if code != 0 or not self.sup.find("run_already_complete") or self.sup.find("child_started"):
            raise InvariantViolation(f"a boot after completion exited {code} or trained again")

    def _report(
        self,
        checker: Checker,
        final_hash: str | None,
        ref_hash: str | None,
        violation: str | None,
    ) -> dict[str, Any]:
        lost, executed, starts = _lost_steps([ln for sup in self.sups for ln in _lines(sup)])
        commits = sum(len(sup.find("checkpoint_committed")) for sup in self.sups)
        applied = sum(self.applied.values())
        ok = (
            violation is None
            and final_hash is not None
            and final_hash == ref_hash
            and applied >= self.s.events
        )
        why = violation
        if why is None and final_hash != ref_hash:
            why = f"final_params_sha256 {final_hash} != uninterrupted {ref_hash}"
        if why is None and applied < self.s.events:
            why = f"only {applied} of {self.s.events} events applied before the run completed"
        return {
            "ok": ok,
            "failure": why,
            "settings": asdict(self.s),
            "trainer_flags": self.flags,
            "events_applied": applied,
            "events_by_kind": dict(sorted(self.applied.items())),
            "events_skipped_no_window": dict(sorted(self.skipped.items())),
            "outcomes": dict(sorted(self.outcomes.items())),
            "commits": commits,
            "emergency_commits": sum(len(sup.find("emergency_committed")) for sup in self.sups),
            "committed_steps_seen": len(checker.seen),
            "lost_steps": lost,
            "steps_executed": executed,
            "trainer_starts": starts,
            "supervisor_boots": self.boots,
            "instances": self.new_instances,
            "unexpected_supervisor_exits": self.unexpected_exits,
            "invariant_checks": checker.checks,
            "restore_checks": checker.restore_checks,
            "max_committed_at_once": checker.max_committed,
            "over_retention_count": checker.over_count,
            "final_params_sha256": final_hash,
            "uninterrupted_params_sha256": ref_hash,
            "hash_equal": final_hash is not None and final_hash == ref_hash,
            "wall_seconds": round(time.monotonic() - self.t0, 1),
            "events": self.records,
        }

    def _cleanup(self, reference: subprocess.Popen[bytes]) -> None:
        for i, sup in enumerate(self.sups, 1):
            if sup.proc is not None and sup.proc.poll() is None:
                sup.proc.kill()
                sup.proc.wait(timeout=10)
            # The evidence: every boot's events and trainer lines.
            (self.work / f"boot-{i:03d}.log").write_text("\n".join(_lines(sup)) + "\n")
        for pid in self.trainer_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if reference.poll() is None:
            reference.kill()
            reference.wait(timeout=10)
        self.emulator.stop()
        self.proxy.stop()
        self.s3.stop()


def _final_hash(lines: list[str]) -> str | None:
    for ln in lines:
        if ln.startswith("final_params_sha256="):
            return ln.split("=", 1)[1].strip()
    return None


def _lost_steps(lines: list[str]) -> tuple[int, int, int]:
    """(steps retrained, steps executed, trainer starts) from the trainers' output, in order.

    Lost steps: over every start of the trainer, the step its predecessor reached minus
    the step it resumed from."""
    lost = executed = starts = 0
    last = 0
    for ln in lines:
        m = _STEP_LINE_RE.match(ln)
        if m:
            last = int(m.group(1))
            executed += 1
            continue
        m = _RESUMED_RE.match(ln)
        if m or ln.startswith("start step=0"):
            resumed = int(m.group(1)) if m else 0
            lost += max(0, last - resumed)
            last = resumed
            starts += 1
    return lost, executed, starts


def _brief(rec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("rule",)) or str(
        rec.get("rule")
    )


def summary(report: dict[str, Any]) -> str:
    """The counts, for a human."""
    kinds = ", ".join(f"{k} {v}" for k, v in report["events_by_kind"].items())
    return "\n".join(
        [
            f"events: {report['events_applied']} ({kinds})",
            f"skipped for want of a window: {report['events_skipped_no_window']}",
            f"outcomes: {report['outcomes']}",
            f"commits: {report['commits']} (emergency {report['emergency_commits']}), "
            f"committed steps seen: {report['committed_steps_seen']}",
            f"lost steps: {report['lost_steps']} (steps executed {report['steps_executed']} "
            f"for {report['settings']['steps']}), trainer starts: {report['trainer_starts']}, "
            f"supervisor boots: {report['supervisor_boots']} on {report['instances']} instances",
            f"invariant checks: {report['invariant_checks']}, restore checks: "
            f"{report['restore_checks']}, most committed at once: "
            f"{report['max_committed_at_once']}",
            f"final_params_sha256: {report['final_params_sha256']}",
            f"uninterrupted:       {report['uninterrupted_params_sha256']}  "
            f"equal: {report['hash_equal']}",
            f"wall time: {report['wall_seconds']} s",
            "RESULT: " + ("ok" if report["ok"] else f"FAILED: {report['failure']}"),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The chaos run (see the module docstring).")
    ap.add_argument("--short", action="store_true", help="the suite's short version")
    ap.add_argument("--events", type=int, help="events to inject")
    ap.add_argument("--seed", type=int, help="seed of the schedule")
    ap.add_argument("--steps", type=int, help="trainer --steps")
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--echo", action="store_true", help="print the supervisors' output")
    args = ap.parse_args(argv)
    base = SHORT if args.short else FULL
    settings = Settings(
        **{
            **asdict(base),
            **{k: v for k, v in (("events", args.events), ("seed", args.seed)) if v is not None},
            **({"steps": args.steps} if args.steps is not None else {}),
        }
    )
    from daemon import log

    log.configure(level="warning", stream=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="spot-chaos-"))
    report: dict[str, Any] = {"ok": False}
    try:
        report = Chaos(settings, work, echo=args.echo).run()
    finally:
        if args.keep or not report["ok"]:
            print(f"work dir kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(report), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
