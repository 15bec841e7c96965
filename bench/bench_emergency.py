"""Notice -> committed for the reference trainer: the pipelined emergency upload against
the physical limit, max(write alone, upload alone), all three measured in one run.

The trainer is ``python -m trainer.example`` at its defaults (its own ``--shard-mb``,
async saves) with ``--state-mb`` of extra state, 384 MiB and 2 GiB (``--quick``: 64
MiB), on each server of :mod:`bench.servers` behind the AWS-like shaping. The notice is
its SIGTERM: the trainer saves a checkpoint (reason ``interrupt``) at its next step
boundary, as CONTRACT §4 says, and exits. Three ways, interleaved in each repeat:

* write alone: SIGTERM until the checkpoint directory is renamed into place, no upload;
* upload alone: :meth:`CheckpointStore.upload_checkpoint` of that finished checkpoint,
  the daemon's default settings;
* pipelined: what ``spot-supervisor run`` does on a notice: the sync worker and its
  watch run before it, :meth:`CheckpointSync.begin_emergency` starts the stager at the
  notice (each ``.partial`` file is uploaded part by part as it grows, completed at its
  rename; see :mod:`daemon.storage.tail`), and the commit follows the directory's
  rename. Timed from the SIGTERM to the manifest written (the commit).

Target: pipelined <= 1.15 x max(write alone, upload alone). The server and the shaping
proxy run on CPUs of their own, the trainer and the uploader (the instance) on the others
(:mod:`bench.placement`), as on AWS, where S3's work is not done on the instance's CPUs.
Each way also records the CPU seconds of each party (trainer, server, shaping proxy,
ours), ``server_busy`` (the server's CPU seconds per second of the way: near 1, the
stand-in set the pace), and ``instance_floor_s``: the CPU seconds of the trainer and
ours in the pipelined way over the instance's CPUs, the shortest time the pipelined way
could take on them when both are CPU-bound at once.

Each row's ratio is that of the medians over its repeats (:data:`SIZES`); beside it,
``paired_ratios`` gives each repeat's pipelined way over that repeat's own alone ways,
which ran next to it: this VM's speed drifts within minutes, and the pairs show how far.

The ways run in an order that turns with each repeat, and each row records
``page_cache_sys_s_per_gb`` before and after it (:func:`bench.common.page_cache_cost`):
on a VM that charges for new page cache, the three ways' bytes cost the trainer and the
server more CPU on a slow day, and a row from one is seen as such.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
import psutil

from bench.bench_transfer import each_server, empty_bucket, make_store
from bench.common import Context, Row, capture_info, page_cache_cost
from bench.servers import REPO, Server
from daemon import layout
from daemon.deadline import ThroughputEstimate
from daemon.standins.faultproxy import CONTROL_STATS_PATH
from daemon.storage.sync import CheckpointSync, SyncStats

PARTIES = ("trainer", "server", "proxy", "ours")
# State sizes (MiB) and the repeats of each. On this VM one repeat's ratio ranged from
# 0.94 to 1.34 at 2 GiB for the same code on two days, so a median of two repeats decided
# the row by chance. Even counts, so that each way runs first as often; at 2 GiB four
# repeats take about 6 minutes per server.
SIZES = {384: 6, 2048: 4}
QUICK_SIZES = {64: 1}


class CpuMeter:
    """CPU seconds (user + system) of the trainer, server, proxy and us.

    The trainer's count only from the notice on: its whole life's (a reaped child's
    rusage) less what it had used before the notice (:meth:`Trainer.notice` samples it),
    so its start-up (importing torch, building its state) is not counted.
    """

    def __init__(self, srv: Server) -> None:
        self._server = psutil.Process(srv.proc.pid)
        self._proxy = psutil.Process(srv.proxy.pid)
        self._self = psutil.Process()

    def snapshot(self) -> dict[str, float]:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {"trainer": kids.ru_utime + kids.ru_stime}
        for name, p in (("server", self._server), ("proxy", self._proxy), ("ours", self._self)):
            t = p.cpu_times()
            out[name] = t.user + t.system
        return out

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in PARTIES}


class Trainer:
    """The reference trainer in ``local_dir``, started and trained past its first steps."""

    def __init__(self, local_dir: Path, run_id: str, state_mb: int) -> None:
        self.local_dir = local_dir
        local_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "SPOT_CHECKPOINT_DIR": str(local_dir),
            "SPOT_RUN_ID": run_id,
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainer.example",
                "--steps",
                "100000000",
                "--save-every",
                "100000000",
                "--step-seconds",
                "0.01",
                "--state-mb",
                str(state_mb),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # its log says when the snapshot buffers are ready
            text=True,
        )
        self.cpu_before_notice = 0.0
        self._started = threading.Event()
        self._warm = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("start ") or line.startswith("resumed "):
                self._started.set()
            elif "snapshot buffers ready" in line:
                self._warm.set()

    def wait_started(self) -> None:
        """Until the trainer is in its steady rhythm, as a notice finds it in a long run:
        training, and its snapshot buffers allocated (at 2 GiB that takes seconds, which
        a notice in the first seconds after start-up would find the trainer doing)."""
        if not (self._started.wait(120) and self._warm.wait(120)):
            self.proc.kill()
            raise RuntimeError("the reference trainer did not start, or its buffers never warmed")
        time.sleep(1.0)  # a few more steps past the warm-up

    def notice(self) -> float:
        """SIGTERM (the notice); its time. Samples the CPU used before it."""
        t = psutil.Process(self.proc.pid).cpu_times()
        self.cpu_before_notice = t.user + t.system + t.children_user + t.children_system
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        return t0

    def wait_checkpoint(self, timeout: float = 600) -> Path:
        """The checkpoint directory, as soon as it is renamed into place."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = layout.list_step_dirs(self.local_dir)
            if found:
                return found[0][1]
            if self.proc.poll() not in (None, 0):
                raise RuntimeError(f"the trainer failed with status {self.proc.returncode}")
            time.sleep(0.002)
        raise RuntimeError("no checkpoint within the timeout")

    def wait_exit(self) -> None:
        if self.proc.wait(120) != 0:
            raise RuntimeError(f"the trainer exited with status {self.proc.returncode}")


def _write_alone(
    work: Path, run_id: str, mb: int, meter: CpuMeter
) -> tuple[float, Path, dict[str, float]]:
    c0 = meter.snapshot()
    t = Trainer(work, run_id, mb)
    t.wait_started()
    c1 = meter.snapshot()
    t0 = t.notice()
    ckpt = t.wait_checkpoint()
    seconds = time.perf_counter() - t0
    t.wait_exit()
    used = CpuMeter.delta(c1, meter.snapshot())
    used["trainer"] = meter.snapshot()["trainer"] - c0["trainer"] - t.cpu_before_notice
    return seconds, ckpt, used


def _served_bytes(srv: Server) -> int:
    """Response body bytes the shaping proxy has relayed to clients so far: what a way
    read back from the server (a lost complete answer's object, read and hashed)."""
    url = srv.endpoint_url + CONTROL_STATS_PATH
    with urllib.request.urlopen(url, timeout=10) as resp:
        return int(json.load(resp)["bytes_down"])


def _late_completes(logs: Sequence[Mapping[str, object]]) -> dict[str, int]:
    """The completes whose answer outlasted the read timeout (their upload was found done
    on the retry), and the objects read back to learn what they hold. Each costs the way
    a wait, and a read back the server's time: a row that misses says whether they did."""
    events = Counter(str(e["event"]) for e in logs)
    return {
        "completed_on_retry": events["upload_completed_on_retry"]
        + events["tail_upload_completed_on_retry"],
        "read_back": events["tail_upload_read_back"],
    }


def _upload_alone(
    srv: Server, bucket: str, run_id: str, ckpt: Path
) -> tuple[float, dict[str, Any]]:
    store = make_store(srv.endpoint_url, bucket, run_id)
    try:
        manifest = layout.load_complete(ckpt, hash_files=False)
        served = _served_bytes(srv)
        t0 = time.perf_counter()
        with capture_info() as logs:
            store.upload_checkpoint(ckpt, manifest)
        seconds = time.perf_counter() - t0
        return seconds, {**_late_completes(logs), "bytes_served": _served_bytes(srv) - served}
    finally:
        store.close()


def _pipelined(
    srv: Server, bucket: str, run_id: str, work: Path, mb: int, meter: CpuMeter
) -> tuple[float, dict[str, float], dict[str, Any]]:
    store = make_store(srv.endpoint_url, bucket, run_id)
    committed = threading.Event()
    at: list[float] = []

    def on_change(stats: SyncStats) -> None:
        if stats.newest_committed_step is not None and not committed.is_set():
            at.append(time.perf_counter())
            committed.set()

    sync = CheckpointSync(
        store, work, ThroughputEstimate(), rescan_interval=60, on_change=on_change
    )
    kids0 = meter.snapshot()["trainer"]
    trainer = Trainer(work, run_id, mb)
    try:
        with capture_info() as logs:
            sync.start()  # the daemon's watch and worker, running before the notice
            trainer.wait_started()
            cpu0 = meter.snapshot()
            served = _served_bytes(srv)
            t0 = trainer.notice()
            sync.begin_emergency()  # the supervisor starts staging as it signals
            if not committed.wait(600):
                raise RuntimeError("the pipelined checkpoint was not committed")
            seconds = at[0] - t0
            served = _served_bytes(srv) - served
            trainer.wait_exit()
            cpu = CpuMeter.delta(cpu0, meter.snapshot())
            # Files seen only once renamed are hashed after a pending commit: not timed.
            sync.wait_verified(600)
            cpu["trainer"] = meter.snapshot()["trainer"] - kids0 - trainer.cpu_before_notice
            sync.stop()
        taken = [e for e in logs if e["event"] == "checkpoint_committed"]
        tails = [e for e in logs if e["event"] == "tail_upload_completed"]
        resent = [e for e in logs if e["event"] == "staged_file_resent"]
        detail: dict[str, Any] = {
            "resent": [f"{e['path']}: {e['reason']}" for e in resent],
            "bytes_staged": sum(int(str(e["bytes_staged"])) for e in taken),
            "bytes_sent_at_commit": sum(int(str(e["bytes_sent"])) for e in taken),
            "sent_while_writing": sum(int(str(e["sent_while_writing"])) for e in tails),
            "files_followed": len(tails),
            **_late_completes(logs),
            "bytes_served": served,
        }
        return seconds, cpu, detail
    finally:
        if trainer.proc.poll() is None:
            trainer.proc.kill()
            trainer.proc.wait()
        sync.stager.close()
        store.close()


def _one_size(ctx: Context, srv: Server, mb: int, repeats: int) -> Row:
    direct = boto3.client("s3", endpoint_url=srv.direct_url, region_name="us-east-1")
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(Bucket=bucket)
    meter = CpuMeter(srv)
    work = Path(ctx.workdir) / f"emergency-{srv.name}-{mb}"
    samples: dict[str, list[float]] = {"write": [], "upload": [], "pipelined": []}
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in samples}
    details: list[dict[str, Any]] = []
    uploads: list[dict[str, Any]] = []
    files = 0
    nbytes = 0
    page_cost = [page_cache_cost(ctx.workdir)]

    def alone(r: int) -> None:
        nonlocal files, nbytes
        d = work / f"alone-{r}"
        seconds, ckpt, used = _write_alone(d, f"alone-{r}", mb, meter)
        samples["write"].append(seconds)
        cpu["write"].append(used)
        manifest = layout.load_complete(ckpt, hash_files=False)
        files, nbytes = len(manifest.files), manifest.total_bytes
        c1 = meter.snapshot()
        seconds, detail = _upload_alone(srv, bucket, f"alone-{r}", ckpt)
        samples["upload"].append(seconds)
        uploads.append(detail)
        cpu["upload"].append(CpuMeter.delta(c1, meter.snapshot()))
        empty_bucket(direct, bucket)
        shutil.rmtree(d, ignore_errors=True)

    def pipelined(r: int) -> None:
        d = work / f"pipe-{r}"
        seconds, used, detail = _pipelined(srv, bucket, f"pipe-{r}", d, mb, meter)
        samples["pipelined"].append(seconds)
        cpu["pipelined"].append(used)
        details.append(detail)
        empty_bucket(direct, bucket)
        shutil.rmtree(d, ignore_errors=True)

    for r in range(repeats):
        # The order turns with each repeat, so that neither way always runs right after
        # the other has freed its GBs (the server's objects, the checkpoint's page cache):
        # on a VM that charges for memory it takes back, the way after a free pays more.
        # Upload alone needs write alone's checkpoint, so those two stay together.
        for way in (alone, pipelined) if r % 2 == 0 else (pipelined, alone):
            way(r)
    page_cost.append(page_cache_cost(ctx.workdir))
    direct.delete_bucket(Bucket=bucket)
    med = {k: statistics.median(v) for k, v in samples.items()}
    limit = max(med["write"], med["upload"])
    gb = nbytes / 1e9
    cpu_per_gb = {
        way: {p: round(statistics.median(c[p] for c in runs) / gb, 2) for p in PARTIES}
        for way, runs in cpu.items()
    }
    instance_cpus = len(srv.placement.instance or os.sched_getaffinity(0))
    # The parties on the instance's CPUs: all of them when nothing is pinned.
    on_instance = ("trainer", "ours") if srv.placement.pinned else PARTIES
    floor = round(sum(cpu_per_gb["pipelined"][p] for p in on_instance) * gb / instance_cpus, 3)
    busy = {
        way: round(
            statistics.median(c["server"] / t for c, t in zip(runs, samples[way], strict=True)), 2
        )
        for way, runs in cpu.items()
    }
    ratio = med["pipelined"] / limit
    # Each repeat's pipelined way against its own alone ways, run next to it: this VM's
    # speed drifts by a fifth within minutes, which these pairs see and the medians mix.
    paired = [
        round(p / max(w, u), 3)
        for w, u, p in zip(samples["write"], samples["upload"], samples["pipelined"], strict=True)
    ]
    return Row(
        "emergency",
        f"notice -> committed, reference trainer, {mb:,} MiB state",
        "s",
        med["pipelined"],
        limit,
        "max(write alone, upload alone), same run",
        f"{files} files, {nbytes / 1e6:,.0f} MB",
        repeats,
        better="lower",
        target="<= 1.15",
        met=ratio <= 1.15,
        server=srv.label,
        extra={
            "seconds": {k: [round(x, 3) for x in v] for k, v in samples.items()},
            "median_seconds": {k: round(v, 3) for k, v in med.items()},
            "sequential_s": round(med["write"] + med["upload"], 3),
            "paired_ratios": paired,
            "median_paired_ratio": round(statistics.median(paired), 3),
            "pipelined": details,
            "upload_alone": uploads,
            "cpu_s_per_gb": cpu_per_gb,
            "instance_cpus": instance_cpus,
            "instance_floor_s": floor,
            "pipelined_vs_instance_floor": round(med["pipelined"] / floor, 3) if floor else None,
            "server_busy": busy,
            "page_cache_sys_s_per_gb": {"before": page_cost[0], "after": page_cost[1]},
        },
    )


def run(ctx: Context) -> list[Row]:
    """Each state size on each server, the three ways interleaved in every repeat."""
    sizes = QUICK_SIZES if ctx.quick else SIZES
    rows: list[Row] = []
    for srv in each_server(ctx):
        for mb, repeats in sizes.items():
            rows.append(_one_size(ctx, srv, mb, repeats))
    return rows
