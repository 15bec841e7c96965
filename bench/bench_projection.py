"""The physical frame: a 7B model's emergency upload on a p4d.24xlarge, *projected*.

Not a measurement of AWS. What is measured, in this run, on each server behind the
AWS-like shaping (:mod:`bench.servers`), is the rate of one connection: a file of 256
MiB (``--quick``: 32 MiB) sent as a multipart upload in the daemon's part size, one
part at a time, so each part pays the first-byte latency as it would against S3. From
that rate ``r`` and the instance's network the projection is:

* checkpoint: a 7B-parameter model with Adam in mixed precision, ~16 bytes per
  parameter (bf16 weights and gradients are not saved; fp32 master weights and the two
  Adam moments are, with the bf16 weights): 112 GB;
* p4d.24xlarge: 400 Gbps of network (50 GB/s), far above what one S3 prefix needs here;
* upload seconds with ``c`` connections: 112 GB / min(c x r, 50 GB/s), at the daemon's
  default ``s3.max_concurrency`` against boto3's (and the AWS CLI's) default of 10
  concurrent requests; and the fewest connections that fit it into 100 s (a two-minute
  notice less detection, the safety margin and the final commit).

With the tail uploads the trainer's write runs alongside the upload, so notice ->
committed is about the larger of the two plus the last part's time; the write side of
a p4d (local NVMe) is not modelled here.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import uuid
from pathlib import Path

import boto3
from s3transfer.manager import TransferManager

from bench.common import Context, Row
from bench.servers import SERVERS, Server, available, server
from daemon.config import S3Config
from daemon.storage.s3client import make_s3_client, make_transfer_config

MiB = 1024 * 1024
CHECKPOINT_BYTES = 112e9  # 7B parameters x 16 bytes
NIC_BYTES_PER_S = 400e9 / 8  # p4d.24xlarge: 400 Gbps
BUDGET_S = 100.0
DEFAULT_CLIENT_CONCURRENCY = 10  # boto3's TransferConfig and the AWS CLI's default


def _one_connection_rate(srv: Server, path: Path, repeats: int) -> list[float]:
    """MB/s of one connection sending ``path`` part after part, as our uploads do."""
    direct = boto3.client("s3", endpoint_url=srv.direct_url, region_name="us-east-1")
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(Bucket=bucket)
    part = S3Config().part_size_mb * MiB
    client = make_s3_client(srv.endpoint_url, "us-east-1", 2)
    rates = []
    try:
        for i in range(repeats):
            tm = TransferManager(client, make_transfer_config(part, 1))
            t0 = time.perf_counter()
            tm.upload(
                str(path), bucket, f"one-{i}", extra_args={"ChecksumAlgorithm": "CRC32"}
            ).result()
            rates.append(path.stat().st_size / (time.perf_counter() - t0) / 1e6)
            tm.shutdown()
            direct.delete_object(Bucket=bucket, Key=f"one-{i}")
    finally:
        direct.delete_bucket(Bucket=bucket)
    return rates


def upload_seconds(connections: int, rate_mb_s: float) -> float:
    """112 GB over ``connections`` of ``rate_mb_s`` each, capped by the instance's NIC."""
    return CHECKPOINT_BYTES / min(connections * rate_mb_s * 1e6, NIC_BYTES_PER_S)


def connections_needed(rate_mb_s: float, budget_s: float = BUDGET_S) -> int:
    """The fewest connections that send 112 GB within ``budget_s``."""
    return math.ceil(CHECKPOINT_BYTES / (budget_s * rate_mb_s * 1e6))


def run(ctx: Context) -> list[Row]:
    repeats = ctx.repeats(3, 1)
    work = Path(ctx.workdir) / "projection"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "one.bin"
    path.write_bytes(os.urandom((32 if ctx.quick else 256) * MiB))
    ours_c = S3Config().max_concurrency
    rows = []
    for name in SERVERS:
        why = available(name)
        if why is not None:
            print(f"   {name} skipped: {why}", flush=True)
            continue
        with server(name, work) as srv:
            rates = _one_connection_rate(srv, path, repeats)
        r = statistics.median(rates)
        needed = connections_needed(r)
        ours = upload_seconds(ours_c, r)
        rows.append(
            Row(
                "projection",
                f"7B + Adam (112 GB) emergency upload on a p4d.24xlarge, {ours_c} connections",
                "s",
                ours,
                upload_seconds(DEFAULT_CLIENT_CONCURRENCY, r),
                f"the same at {DEFAULT_CLIENT_CONCURRENCY} connections (boto3/AWS CLI default)",
                f"{r:.0f} MB/s per connection measured; {needed} connections fit 100 s",
                repeats,
                better="lower",
                target=f"<= {BUDGET_S:g} s",
                met=ours <= BUDGET_S,
                server=f"projection from one connection to {srv.label}",
                extra={
                    "connection_mb_per_s": [round(x, 1) for x in rates],
                    "connections_for_100_s": needed,
                    "checkpoint_bytes": CHECKPOINT_BYTES,
                    "nic_bytes_per_s": NIC_BYTES_PER_S,
                    "part_size_mib": S3Config().part_size_mb,
                },
            )
        )
    path.unlink()
    return rows
