"""Daemon footprint: idle RSS and CPU of a real ``spot-supervisor run`` at 1 Hz polling.

Idle means: the trainer runs (here a sleeping stand-in), no notice, nothing to upload.
Baseline in the same run: the seed's poller process (5 s interval, ``requests``). The
supervisor polls five times as often and also watches the disk and keeps state, so the
comparison shows what those cost. Targets: RSS <= 60 MB, CPU <= 0.5 % of one core.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil

from bench.common import Context, Row, s3_with_bucket, spawn_quiet
from daemon.standins.demo import write_config
from daemon.standins.emulator import MetadataEmulator

SLEEPER = [sys.executable, "-c", "import time; time.sleep(3600)"]


def cpu_seconds(p: psutil.Process) -> float:
    """CPU time of every thread of ``p`` so far, in seconds.

    ``/proc/<pid>/task/*/schedstat`` counts nanoseconds; ``cpu_times()`` counts clock
    ticks (10 ms), and a poller that wakes once in a 5 s window can use less than one
    tick, which would read as 0 % and leave no ratio. Falls back to ticks elsewhere.
    """
    total_ns = 0
    try:
        for task in Path(f"/proc/{p.pid}/task").iterdir():
            total_ns += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float(sum(p.cpu_times()[:2]))
    return total_ns / 1e9


def measure(argv: list[str], settle: float, window: float) -> tuple[float, float]:
    """(RSS in MB, CPU % of one core) of the process ``argv`` over ``window`` seconds."""
    proc = spawn_quiet(argv)
    try:
        p = psutil.Process(proc.pid)
        time.sleep(settle)
        t0, c0 = time.monotonic(), cpu_seconds(p)
        rss = 0
        end = t0 + window
        while time.monotonic() < end:
            rss = max(rss, p.memory_info().rss)
            time.sleep(0.5)
        cpu = (cpu_seconds(p) - c0) / (time.monotonic() - t0) * 100
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
    return rss / 1e6, cpu


def run(ctx: Context) -> list[Row]:
    window = 5.0 if ctx.quick else 30.0
    work = Path(ctx.workdir) / "footprint"
    work.mkdir(parents=True, exist_ok=True)
    s3 = s3_with_bucket("bench")
    try:
        with MetadataEmulator() as md:
            cfg = write_config(
                work / "config.toml",
                run_id="footprint",
                command=SLEEPER,
                local_dir=work / "ckpt",
                remote="s3://bench/runs",
                endpoint_url=s3.endpoint_url,
                imds_url=md.url,
                runtime_dir=work / "run",
                poll_interval=1.0,
                extra={"daemon": {"rescan_interval": 30}},
            )
            ours = measure(
                [sys.executable, "-m", "daemon", "run", "--config", str(cfg)],
                settle=3.0,
                window=window,
            )
            seed = measure(
                [sys.executable, "-m", "bench.seed_baseline", md.url, "5", "--", *SLEEPER],
                settle=3.0,
                window=window,
            )
    finally:
        s3.stop()
    size = f"{window:g} s idle, 1 Hz polling"
    # (name, unit, baseline's name, target, limit) of RSS, then CPU, as measure() returns.
    rows = (
        ("daemon RSS", "MB", "seed poller process", "<= 60 MB", 60.0),
        ("daemon CPU", "% core", "seed poller process (5 s)", "<= 0.5 %", 0.5),
    )
    return [
        Row(
            group="footprint",
            name=name,
            unit=unit,
            ours=mine,
            baseline=theirs,
            baseline_name=baseline_name,
            size=size,
            repeats=1,
            target=target,
            met=mine <= limit,
        )
        for (name, unit, baseline_name, target, limit), mine, theirs in zip(
            rows, ours, seed, strict=True
        )
    ]
