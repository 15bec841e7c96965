"""Transfer throughput against moto's S3 server (its own process, loopback), ours vs boto3.

Two shapes, each uploaded and restored in the same run by both sides:

* large: several files of a few hundred MB (>= 1 GB in all; ``--quick``: 128 MB);
* small: 1,000 files of 64 KB (``--quick``: 200).

Ours: :meth:`CheckpointStore.upload_checkpoint` (sha256 and MD5 in one pass, upload with
a CRC32 checksum, ETags checked, manifest last) and
:meth:`CheckpointStore.restore_newest` (parallel ranged GETs hashed while they land,
fsync, rename). Baseline: boto3's default ``upload_file`` /
``download_file`` for each file in turn, which neither hashes nor fsyncs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
from structlog.testing import capture_logs

from bench.common import Context, Row
from daemon import layout
from daemon.standins import FAKE_AWS_ENV, use_fake_aws_credentials
from daemon.storage.s3client import RemoteLocation, make_s3_client, make_transfer_config
from daemon.storage.store import CheckpointStore

MiB = 1024 * 1024
RUN = "bench"
PART_SIZE = 16 * MiB
CONCURRENCY = 8


@dataclass
class MotoProcess:
    """moto's S3 server in a process of its own, as a real endpoint would be."""

    endpoint_url: str
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def moto_process() -> Iterator[MotoProcess]:
    """Start ``python -m moto.server`` on a free loopback port; stop it afterwards."""
    use_fake_aws_credentials()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **FAKE_AWS_ENV},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield MotoProcess(url, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_store(endpoint_url: str, bucket: str, run_id: str = RUN) -> CheckpointStore:
    """Our store, tuned as a benchmark on loopback wants it (16 MiB parts, 8 in flight)."""
    client = make_s3_client(endpoint_url, "us-east-1", 2 * CONCURRENCY + 2)
    config = make_transfer_config(PART_SIZE, CONCURRENCY)
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


def _empty_bucket(client: object, bucket: str) -> None:
    s3 = client  # a plain boto3 client
    paginator = s3.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})  # type: ignore[attr-defined]


def _interleaved(
    ours: Callable[[], float], base: Callable[[], float], repeats: int
) -> tuple[list[float], list[float]]:
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        a.append(ours())
        b.append(base())
    return a, b


def _measure_shape(
    ctx: Context, moto: MotoProcess, name: str, sizes: list[int], repeats: int
) -> list[Row]:
    client = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1")
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    work = Path(ctx.workdir) / f"transfer-{name}"
    src, manifest = write_checkpoint(work / "src", 1, sizes)
    total = manifest.total_bytes
    files = [src / e.path for e in manifest.files]

    def ours_up() -> float:
        _empty_bucket(client, bucket)
        store = make_store(moto.endpoint_url, bucket)
        try:
            t0 = time.perf_counter()
            with capture_logs():
                store.upload_checkpoint(src, manifest)
            return total / (time.perf_counter() - t0) / 1e6
        finally:
            store.close()

    def boto_up() -> float:
        _empty_bucket(client, bucket)
        t0 = time.perf_counter()
        for p in files:
            client.upload_file(str(p), bucket, f"plain/{p.name}")
        return total / (time.perf_counter() - t0) / 1e6

    def ours_down() -> float:
        dest = work / "dest-ours"
        shutil.rmtree(dest, ignore_errors=True)
        store = make_store(moto.endpoint_url, bucket)
        try:
            t0 = time.perf_counter()
            with capture_logs():
                result = store.restore_newest(dest)
            seconds = time.perf_counter() - t0
        finally:
            store.close()
        assert result is not None and result.downloaded
        return total / seconds / 1e6

    def boto_down() -> float:
        dest = work / "dest-boto"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        t0 = time.perf_counter()
        for p in files:
            client.download_file(bucket, f"plain/{p.name}", str(dest / p.name))
        return total / (time.perf_counter() - t0) / 1e6

    # Interleaved, ours then boto3 in each repeat, so drift on a shared machine hits both.
    # Uploads first (each side empties the bucket), then both copies stay for downloads.
    up_ours_all, up_boto_all = _interleaved(ours_up, boto_up, repeats)
    _empty_bucket(client, bucket)
    store = make_store(moto.endpoint_url, bucket)
    with capture_logs():
        store.upload_checkpoint(src, manifest)
    store.close()
    for p in files:
        client.upload_file(str(p), bucket, f"plain/{p.name}")
    down_ours_all, down_boto_all = _interleaved(ours_down, boto_down, repeats)
    up_ours, up_boto = statistics.median(up_ours_all), statistics.median(up_boto_all)
    down_ours, down_boto = statistics.median(down_ours_all), statistics.median(down_boto_all)
    _empty_bucket(client, bucket)
    client.delete_bucket(Bucket=bucket)
    shutil.rmtree(work, ignore_errors=True)

    size = f"{len(sizes)} files, {total / 1e6:,.0f} MB"
    knobs = {"part_size_mib": PART_SIZE // MiB, "max_concurrency": CONCURRENCY}
    return [
        Row(
            "transfer",
            f"restore {name}",
            "MB/s",
            down_ours,
            down_boto,
            "boto3 download_file",
            size,
            repeats,
            better="higher",
            target=">= 1.0",
            met=down_ours >= down_boto,
            extra={"ours_all": down_ours_all, "baseline_all": down_boto_all, **knobs},
        ),
        Row(
            "transfer",
            f"upload {name}",
            "MB/s",
            up_ours,
            up_boto,
            "boto3 upload_file",
            size,
            repeats,
            better="higher",
            extra={"ours_all": up_ours_all, "baseline_all": up_boto_all, **knobs},
        ),
    ]


def run(ctx: Context) -> list[Row]:
    """Large files and many small files, up and down, ours and boto3's, in one run."""
    repeats = ctx.repeats(3, 2)
    large = [32 * MiB] * 4 if ctx.quick else [256 * MiB] * 4
    small = [64 * 1024] * (200 if ctx.quick else 1000)
    with moto_process() as moto:
        rows = _measure_shape(ctx, moto, "large files", large, repeats)
        rows += _measure_shape(ctx, moto, "64 KB files", small, repeats)
    return rows
