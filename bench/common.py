"""The shape of a benchmark result, and the helpers every benchmark uses."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
from structlog.testing import capture_logs

from daemon.standins import FAKE_AWS_ENV, LocalS3, start_local_s3


@dataclass
class Row:
    """One comparison: ours against a baseline measured in the same run.

    ``ratio`` is ours / baseline. ``better`` says which direction wins, and ``target``
    (optional) is the ratio the issue asks for, e.g. ``<= 0.1``.
    """

    group: str
    name: str
    unit: str
    ours: float
    baseline: float | None
    baseline_name: str
    size: str
    repeats: int
    better: str = "lower"  # or "higher"
    target: str | None = None
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Where it was measured: the S3 server and its shaping ("moto, shaped 30 ms + 90
    # MB/s/conn"), "-" where no S3 is involved, "projection" for a computed row.
    server: str = "-"

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.ours / self.baseline

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


@dataclass
class Context:
    """What a benchmark module gets: where to put files, and whether to run a short version."""

    workdir: str
    quick: bool = False

    def repeats(self, full: int, quick: int = 1) -> int:
        return quick if self.quick else full


def median_of(fn: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    """Run ``fn`` (which returns one measurement) ``repeats`` times; the median and all."""
    samples = [fn() for _ in range(repeats)]
    return statistics.median(samples), samples


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def page_cache_cost(workdir: str, mib: int = 256) -> float:
    """System CPU seconds per GB that writing ``mib`` MiB of new page cache costs now
    (``dd`` with an fsync, its rusage). Some VMs charge for every page the host took back
    (free page reporting), and how much varies over a day: under 1 s on a quiet day
    here, 9 s on a slow one. A benchmark that writes GBs records it beside its rows, so
    that a run on a slow day is seen as one."""
    target = Path(workdir) / f"page-cost-{os.getpid()}.bin"
    proc = subprocess.Popen(
        ["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={mib // 16}", "conv=fsync"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        target.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dd of {mib} MiB into {workdir} failed ({proc.returncode})")
    return round(usage.ru_stime / (mib * 1024 * 1024 / 1e9), 2)


def spawn_quiet(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start a process under test with the stand-ins' credentials and its output dropped."""
    return subprocess.Popen(
        argv,
        env={**os.environ, **FAKE_AWS_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def s3_with_bucket(bucket: str = "bench") -> LocalS3:
    """moto's S3 server on loopback with one empty bucket; ``stop()`` it when done."""
    import boto3

    s3 = start_local_s3()
    boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    return s3


@contextlib.contextmanager
def capture_info() -> Iterator[list[MutableMapping[str, object]]]:
    """structlog's ``capture_logs`` at info level, whatever level the harness set (it
    keeps the stand-ins quiet at warning; a benchmark reads its own info events)."""
    old = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(wrapper_class=old)
