"""Time to committed after a notice: the pipelined emergency upload against the alternatives.

A writer process saves a checkpoint the way CONTRACT §4 says (several shard files, each
``<name>.partial``, fsynced, renamed; manifest last; directory renamed) at disk speed.
Against moto's S3 server in its own process on loopback, in one run, for the same
shape of checkpoint (>= 512 MB in 8 files; ``--quick``: 64 MB):

* write alone: the writer, from start to rename;
* upload alone: :meth:`CheckpointStore.upload_checkpoint` of the finished checkpoint;
* sequential: write, then upload (what a supervisor without the pipeline does);
* pipelined: the :class:`~daemon.storage.pipeline.Stager` sends each shard as soon as it is
  renamed, the commit follows the directory's rename (what ``run`` does on a notice).

The physical limit is max(write alone, upload alone); the target is pipelined <= 1.15x it.

Each way also reports the CPU seconds per GB of each party (the writer process, moto's
process, and ours), and ``cpu_floor_s``: their sum over the machine's cores, the shortest
time the pipelined way could take when all three are CPU-bound at once. On a machine
with few cores that floor, not max(write, upload), is the real limit.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import psutil
from structlog.testing import capture_logs

from bench.bench_transfer import MotoProcess, make_store, moto_process
from bench.common import Context, Row
from daemon import layout
from daemon.deadline import ThroughputEstimate
from daemon.storage.sync import CheckpointSync

MiB = 1024 * 1024
SHARDS = 8

WRITER = """
import os, sys
from daemon import layout
local_dir, run_id, step, shard_bytes, shards = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
block = os.urandom(min(shard_bytes, 16 * 1024 * 1024))
with layout.CheckpointWriter(layout.Path(local_dir), run_id, step, "interrupt") as w:
    for i in range(shards):
        with w.open_file(f"shard-{i:02d}.bin") as f:
            left = shard_bytes
            while left:
                n = min(left, len(block))
                f.write(block[:n] if left != shard_bytes else i.to_bytes(8, "little") + block[8:n])
                left -= n
    w.commit()
"""


PARTIES = ("writer", "moto", "ours")


class CpuMeter:
    """CPU seconds (user + system) of the writer (reaped children), moto, and this process."""

    def __init__(self, moto: MotoProcess) -> None:
        self._moto = psutil.Process(moto.proc.pid)
        self._self = psutil.Process()

    def snapshot(self) -> dict[str, float]:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        m = self._moto.cpu_times()
        me = self._self.cpu_times()
        return {
            "writer": kids.ru_utime + kids.ru_stime,
            "moto": m.user + m.system,
            "ours": me.user + me.system,
        }

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in PARTIES}


def _writer(local_dir: Path, run_id: str, step: int, shard_bytes: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            str(local_dir),
            run_id,
            str(step),
            str(shard_bytes),
            str(SHARDS),
        ],
        env=env,
    )


def _write(local_dir: Path, run_id: str, step: int, shard_bytes: int) -> float:
    t0 = time.perf_counter()
    if _writer(local_dir, run_id, step, shard_bytes).wait() != 0:
        raise RuntimeError("writer failed")
    return time.perf_counter() - t0


def _upload(moto: MotoProcess, bucket: str, run_id: str, ckpt: Path) -> float:
    store = make_store(moto.endpoint_url, bucket, run_id)
    try:
        manifest = layout.load_complete(ckpt, hash_files=False)
        t0 = time.perf_counter()
        with capture_logs():
            store.upload_checkpoint(ckpt, manifest)
        return time.perf_counter() - t0
    finally:
        store.close()


def _pipelined(
    moto: MotoProcess, bucket: str, run_id: str, local: Path, shard_bytes: int, meter: CpuMeter
) -> tuple[float, int, dict[str, float]]:
    store = make_store(moto.endpoint_url, bucket, run_id)
    sync = CheckpointSync(store, local, ThroughputEstimate(), rescan_interval=60)
    try:
        with capture_logs() as logs:
            sync.start()  # the daemon's watch, running before the notice
            cpu0 = meter.snapshot()
            t0 = time.perf_counter()  # the notice: SIGTERM, and staging begins
            sync.begin_emergency()
            proc = _writer(local, run_id, 1, shard_bytes)
            if proc.wait() != 0:
                raise RuntimeError("writer failed")
            sync.stop()  # the child exited: the final flush commits
            committed = sync.flush()
            seconds = time.perf_counter() - t0
            cpu = CpuMeter.delta(cpu0, meter.snapshot())
            # The sha256 of the staged files, after the commit (retention waits for it).
            if not sync.wait_verified(600):
                raise RuntimeError("the pending commit was not verified")
        if committed != 1:
            raise RuntimeError(f"pipelined run committed {committed}, not step 1")
        staged = sum(e["bytes"] for e in logs if e["event"] == "staged_files_taken")
        return seconds, staged, cpu
    finally:
        sync.stager.close()
        store.close()


def _clean(client: object, bucket: str) -> None:
    paginator = client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})  # type: ignore[attr-defined]


def run(ctx: Context) -> list[Row]:
    """One row per ratio the issue asks for, all four ways measured in each repeat."""
    total = 64 * MiB if ctx.quick else 512 * MiB
    shard = total // SHARDS
    repeats = ctx.repeats(3, 1)
    work = Path(ctx.workdir) / "emergency"
    samples: dict[str, list[float]] = {"write": [], "upload": [], "sequential": [], "pipelined": []}
    staged_fraction: list[float] = []
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in samples}
    with moto_process() as moto:
        meter = CpuMeter(moto)
        client = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1")
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        for r in range(repeats):
            # Write alone, then upload alone (of the same checkpoint).
            d = work / f"alone-{r}"
            c0 = meter.snapshot()
            samples["write"].append(_write(d, f"alone-{r}", 1, shard))
            c1 = meter.snapshot()
            samples["upload"].append(
                _upload(moto, bucket, f"alone-{r}", d / layout.step_dir_name(1))
            )
            c2 = meter.snapshot()
            cpu["write"].append(CpuMeter.delta(c0, c1))
            cpu["upload"].append(CpuMeter.delta(c1, c2))
            _clean(client, bucket)
            shutil.rmtree(d, ignore_errors=True)
            # Sequential: save, then upload, timed from the notice.
            d = work / f"seq-{r}"
            c0 = meter.snapshot()
            t0 = time.perf_counter()
            _write(d, f"seq-{r}", 1, shard)
            _upload(moto, bucket, f"seq-{r}", d / layout.step_dir_name(1))
            samples["sequential"].append(time.perf_counter() - t0)
            cpu["sequential"].append(CpuMeter.delta(c0, meter.snapshot()))
            _clean(client, bucket)
            shutil.rmtree(d, ignore_errors=True)
            # Pipelined.
            d = work / f"pipe-{r}"
            seconds, staged, used = _pipelined(moto, bucket, f"pipe-{r}", d, shard, meter)
            samples["pipelined"].append(seconds)
            cpu["pipelined"].append(used)
            staged_fraction.append(staged / (shard * SHARDS))
            _clean(client, bucket)
            shutil.rmtree(d, ignore_errors=True)
        client.delete_bucket(Bucket=bucket)
    med = {k: statistics.median(v) for k, v in samples.items()}
    limit = max(med["write"], med["upload"])
    size = f"{SHARDS} files, {total / 1e6:,.0f} MB"
    gb = total / 1e9
    cpu_per_gb = {
        way: {p: round(statistics.median(c[p] for c in runs) / gb, 2) for p in PARTIES}
        for way, runs in cpu.items()
    }
    cores = os.cpu_count() or 1
    cpu_floor = {way: round(sum(per.values()) * gb / cores, 3) for way, per in cpu_per_gb.items()}
    extra = {
        "seconds": {k: [round(x, 3) for x in v] for k, v in samples.items()},
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "staged_fraction": [round(x, 3) for x in staged_fraction],
        "cpu_s_per_gb": cpu_per_gb,
        "cores": cores,
        "cpu_floor_s": cpu_floor,
        "pipelined_vs_cpu_floor": round(med["pipelined"] / cpu_floor["pipelined"], 3)
        if cpu_floor["pipelined"]
        else None,
    }
    ratio_limit = med["pipelined"] / limit
    return [
        Row(
            "emergency",
            "time to committed vs max(write alone, upload alone)",
            "s",
            med["pipelined"],
            limit,
            "max(write, upload) alone",
            size,
            repeats,
            better="lower",
            target="<= 1.15",
            met=ratio_limit <= 1.15,
            extra=extra,
        ),
        Row(
            "emergency",
            "time to committed vs sequential (save, then upload)",
            "s",
            med["pipelined"],
            med["sequential"],
            "sequential",
            size,
            repeats,
            better="lower",
            extra={"median_seconds": extra["median_seconds"]},
        ),
    ]
