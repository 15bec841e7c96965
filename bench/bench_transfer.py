"""Transfer throughput through AWS-like shaping, ours against boto3 and the AWS CLI.

For each server of :mod:`bench.servers` (moto, s3rver), behind the shaping proxy (30 ms
first byte, 90 MB/s per connection), in one run, two shapes, each uploaded and restored
by every side:

* large: 4 files of 256 MiB (1 GiB; ``--quick``: 4 x 16 MiB);
* small: 900 files of 64 KB (``--quick``: 100). Not 1,000: s3rver cannot list a prefix
  of more than 1,000 keys, and the same shape runs on both servers.

Ours: :meth:`CheckpointStore.upload_checkpoint` (every upload started at once, sha256
and MD5 in one pass beside it, a CRC32 checksum, ETags checked before the manifest,
manifest last) and
:meth:`CheckpointStore.restore_newest` (parallel ranged GETs hashed as they land, each
range's writeback started as it lands, fsync, rename), with the daemon's default
settings (``s3.part_size_mb``, ``s3.max_concurrency``) and connection pool, as
``spot-supervisor run`` builds its store.

The server and the shaping proxy run on CPUs of their own, the sides on the others
(:mod:`bench.placement`), as on AWS. ``server_busy`` in a row's extras is the server's CPU
seconds per second of each side: near 1, the stand-in (one busy thread) set the pace of
that side, and a ratio between two server-bound sides measures the server, not them.

Baseline: boto3's ``upload_file`` / ``download_file`` with the default ``TransferConfig``
(8 MiB parts, 10 threads per file) and a default client, run concurrently over the files
(one thread per file, up to 10), which neither hashes nor fsyncs. Beside it, when the AWS
CLI is installed (PyPI ``awscli``, kept out of the project's environment:
``.venv-awscli``), ``aws s3 cp --recursive`` with its defaults, its start-up included.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import psutil
from structlog.testing import capture_logs

from bench.common import Context, Row
from bench.servers import SERVERS, Server, available, aws_cli, server
from daemon import layout
from daemon.config import S3Config
from daemon.standins import FAKE_AWS_ENV
from daemon.storage.s3client import RemoteLocation, make_s3_client, make_transfer_config
from daemon.storage.store import CheckpointStore

MiB = 1024 * 1024
RUN = "bench"
BOTO3_FILE_THREADS = 10  # boto3's own default concurrency, now over files


def make_store(endpoint_url: str, bucket: str, run_id: str = RUN) -> CheckpointStore:
    """Our store as ``spot-supervisor run`` builds it from the default config."""
    cfg = S3Config()
    concurrency = cfg.max_concurrency
    client = make_s3_client(endpoint_url, "us-east-1", 2 * concurrency + 2)
    config = make_transfer_config(cfg.part_size_mb * MiB, concurrency)
    return CheckpointStore(client, RemoteLocation(bucket, "runs"), run_id, config)


def write_checkpoint(local_dir: Path, step: int, sizes: list[int]) -> tuple[Path, layout.Manifest]:
    """A real checkpoint of random bytes (one random block, made distinct per file)."""
    block = os.urandom(min(max(sizes), 64 * MiB))
    with layout.CheckpointWriter(local_dir, RUN, step, "periodic") as w:
        for i, size in enumerate(sizes):
            with w.open_file(f"shard-{i:04d}.bin") as f:
                left = size
                first = True
                while left:
                    n = min(left, len(block))
                    chunk = block[:n]
                    if first:  # distinct bytes per file: no two files are equal
                        chunk = i.to_bytes(8, "little") + chunk[8:]
                        first = False
                    f.write(chunk)
                    left -= n
        manifest = w.commit()
    return w.final_dir, manifest


def learn_endpoint(srv: Server, workdir: Path) -> None:
    """The daemon's preflight (:meth:`CheckpointStore.check_writable`: whether the server
    refuses a wrong checksum) and one untimed multipart commit, so that what the store
    learns of an endpoint once per process (s3rver's multipart ETags are whole-object
    MD5s: the first is read back, later ones are predicted) is known before any way is
    timed, not by the first only."""
    direct = boto3.client("s3", endpoint_url=srv.direct_url, region_name="us-east-1")
    bucket = f"warm-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(Bucket=bucket)
    src, manifest = write_checkpoint(
        workdir / f"warm-{srv.name}", 1, [2 * S3Config().part_size_mb * MiB]
    )
    store = make_store(srv.endpoint_url, bucket)
    try:
        with capture_logs():
            store.check_writable()
            store.upload_checkpoint(src, manifest)
    finally:
        store.close()
        empty_bucket(direct, bucket)
        direct.delete_bucket(Bucket=bucket)
        shutil.rmtree(src.parent, ignore_errors=True)


def empty_bucket(client: Any, bucket: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=o["Key"])


class Cpu:
    """CPU seconds of this process, reaped children, the server and the proxy."""

    def __init__(self, srv: Server) -> None:
        self._procs = {
            "server": psutil.Process(srv.proc.pid),
            "proxy": psutil.Process(srv.proxy.pid),
        }

    def snapshot(self) -> dict[str, float]:
        me = psutil.Process().cpu_times()
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {"client": me.user + me.system + kids.ru_utime + kids.ru_stime}
        for name, p in self._procs.items():
            t = p.cpu_times()
            out[name] = t.user + t.system
        return out


def _timed(cpu: Cpu, fn: Callable[[], None]) -> tuple[float, dict[str, float]]:
    c0 = cpu.snapshot()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    c1 = cpu.snapshot()
    return seconds, {k: round(c1[k] - c0[k], 2) for k in c0}


def _aws(cli: str, *args: str) -> None:
    env = {**os.environ, **FAKE_AWS_ENV, "AWS_DEFAULT_REGION": "us-east-1"}
    subprocess.run([cli, *args], check=True, env=env, stdout=subprocess.DEVNULL)


def _measure_shape(
    ctx: Context, srv: Server, name: str, sizes: list[int], repeats: int
) -> list[Row]:
    direct = boto3.client("s3", endpoint_url=srv.direct_url, region_name="us-east-1")
    plain = boto3.client("s3", endpoint_url=srv.endpoint_url, region_name="us-east-1")
    # A bucket per side: s3rver cannot list more than 1,000 keys, and 900 small files
    # uploaded by three sides would be 2,700.
    tag = uuid.uuid4().hex[:10]
    buckets = {
        "ours": f"bench-{tag}-ours",
        "boto3": f"bench-{tag}-boto3",
        "aws cli": f"bench-{tag}-cli",
    }
    for b in buckets.values():
        direct.create_bucket(Bucket=b)
    work = Path(ctx.workdir) / f"transfer-{srv.name}-{name.split()[0]}"
    src, manifest = write_checkpoint(work / "src", 1, sizes)
    total = manifest.total_bytes
    files = [src / e.path for e in manifest.files]
    cli = None if ctx.quick else aws_cli()  # its start-up alone outweighs a quick run
    cpu = Cpu(srv)
    ways = ["ours", "boto3"] + (["aws cli"] if cli else [])
    up: dict[str, list[float]] = {w: [] for w in ways}
    down: dict[str, list[float]] = {w: [] for w in ways}
    cpu_up: dict[str, list[dict[str, float]]] = {w: [] for w in ways}
    cpu_down: dict[str, list[dict[str, float]]] = {w: [] for w in ways}

    def ours_up() -> None:
        store = make_store(srv.endpoint_url, buckets["ours"])
        try:
            with capture_logs():
                store.upload_checkpoint(src, manifest)
        finally:
            store.close()

    def boto_up() -> None:
        with ThreadPoolExecutor(min(len(files), BOTO3_FILE_THREADS)) as pool:
            list(
                pool.map(
                    lambda p: plain.upload_file(str(p), buckets["boto3"], f"plain/{p.name}"), files
                )
            )

    def cli_up() -> None:
        assert cli is not None
        dest_url = f"s3://{buckets['aws cli']}/cli/"
        _aws(cli, "s3", "cp", str(src), dest_url, "--recursive", "--quiet",
             "--endpoint-url", srv.endpoint_url)  # fmt: skip

    def ours_down(dest: Path) -> None:
        store = make_store(srv.endpoint_url, buckets["ours"])
        try:
            with capture_logs():
                got = store.restore_newest(dest)
            assert got is not None and got.downloaded
        finally:
            store.close()

    def boto_down(dest: Path) -> None:
        dest.mkdir(parents=True)
        with ThreadPoolExecutor(min(len(files), BOTO3_FILE_THREADS)) as pool:
            list(
                pool.map(
                    lambda p: plain.download_file(
                        buckets["boto3"], f"plain/{p.name}", str(dest / p.name)
                    ),
                    files,
                )
            )

    def cli_down(dest: Path) -> None:
        assert cli is not None
        src_url = f"s3://{buckets['aws cli']}/cli/"
        _aws(cli, "s3", "cp", src_url, str(dest), "--recursive", "--quiet",
             "--endpoint-url", srv.endpoint_url)  # fmt: skip

    uploads = {"ours": ours_up, "boto3": boto_up, "aws cli": cli_up}
    downloads = {"ours": ours_down, "boto3": boto_down, "aws cli": cli_down}

    # Interleaved, every side in each repeat, so drift on a shared machine hits all; the
    # order turns with each repeat, so that no side always goes first (after the files
    # were written) or last.
    def turn(r: int) -> list[str]:
        return ways[r % len(ways) :] + ways[: r % len(ways)]

    for r in range(repeats):
        for w in turn(r):
            empty_bucket(direct, buckets[w])
            seconds, used = _timed(cpu, uploads[w])
            up[w].append(total / seconds / 1e6)
            cpu_up[w].append(used)
    # One copy of each side's objects stays for the downloads.
    for w in ways:
        empty_bucket(direct, buckets[w])
        uploads[w]()
    for r in range(repeats):
        for w in turn(r):
            dest = work / f"dest-{w.replace(' ', '-')}"
            shutil.rmtree(dest, ignore_errors=True)
            seconds, used = _timed(cpu, lambda: downloads[w](dest))  # noqa: B023
            down[w].append(total / seconds / 1e6)
            cpu_down[w].append(used)
            shutil.rmtree(dest, ignore_errors=True)
    for b in buckets.values():
        empty_bucket(direct, b)
        direct.delete_bucket(Bucket=b)
    shutil.rmtree(work, ignore_errors=True)

    size = f"{len(sizes)} files, {total / 1e6:,.0f} MB"
    cfg = S3Config()
    knobs = {"part_size_mib": cfg.part_size_mb, "max_concurrency": cfg.max_concurrency}

    def cpu_med(samples: list[dict[str, float]]) -> dict[str, float]:
        return {k: round(statistics.median(s[k] for s in samples), 2) for k in samples[0]}

    def server_busy(speeds: list[float], samples: list[dict[str, float]]) -> float:
        """The server's CPU seconds per second of the way, median: near 1 (one core: moto
        and s3rver do their work on one thread) means the server set the pace."""
        pairs = zip(speeds, samples, strict=True)
        return round(statistics.median(c["server"] * v * 1e6 / total for v, c in pairs), 2)

    rows = []
    for kind, speeds, cpus in (("upload", up, cpu_up), ("restore", down, cpu_down)):
        ours = statistics.median(speeds["ours"])
        extra = {
            "mb_per_s": {w: [round(x, 1) for x in v] for w, v in speeds.items()},
            "cpu_s": {w: cpu_med(v) for w, v in cpus.items()},
            "server_busy": {w: server_busy(speeds[w], v) for w, v in cpus.items()},
            **knobs,
        }
        base = statistics.median(speeds["boto3"])
        rows.append(
            Row(
                "transfer",
                f"{kind} {name}",
                "MB/s",
                ours,
                base,
                f"boto3 {'upload_file' if kind == 'upload' else 'download_file'}, "
                "default TransferConfig, concurrent over files",
                size,
                repeats,
                better="higher",
                target=">= 1.0",
                met=ours >= base,
                extra=extra,
                server=srv.label,
            )
        )
        if "aws cli" in speeds:
            rows.append(
                Row(
                    "transfer",
                    f"{kind} {name} vs the AWS CLI",
                    "MB/s",
                    ours,
                    statistics.median(speeds["aws cli"]),
                    "aws s3 cp --recursive, defaults, start-up included",
                    size,
                    repeats,
                    better="higher",
                    extra={"mb_per_s": extra["mb_per_s"]},
                    server=srv.label,
                )
            )
    return rows


def run(ctx: Context) -> list[Row]:
    """Large files and many small files, up and down, every side, on each server."""
    repeats = ctx.repeats(3, 1)
    large = [16 * MiB] * 4 if ctx.quick else [256 * MiB] * 4
    small = [64 * 1024] * (100 if ctx.quick else 900)
    rows: list[Row] = []
    for srv in each_server(ctx):
        rows += _measure_shape(ctx, srv, "large files", large, repeats)
        rows += _measure_shape(ctx, srv, "64 KB files", small, repeats)
    return rows


def each_server(ctx: Context) -> Iterator[Server]:
    """Each server of :data:`bench.servers.SERVERS` that can run here, started behind the
    shaping proxy and its endpoint learnt (:func:`learn_endpoint`); the others are
    skipped with a line saying why."""
    for name in SERVERS:
        why = available(name)
        if why is not None:
            print(f"   {name} skipped: {why}", flush=True)
            continue
        with server(name, Path(ctx.workdir)) as srv:
            learn_endpoint(srv, Path(ctx.workdir))
            yield srv
