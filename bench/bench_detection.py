"""Detection latency: notice set in the emulator -> SIGTERM received by the trainer.

Like against like: a real ``spot-supervisor run`` at ``poll_interval`` 5 s against the
seed's poller at its 5 s (a new token every poll), in the same run; and ours at its
default 1 s on its own, against its target (no baseline polls that often). Each boot
gets one notice at a random moment of its poll cycle; the trainer stamps the wall clock
in its SIGTERM handler. Also reported: HTTP requests to the metadata service per
instance-action poll (ours reuses its token; the seed's fetches one per poll).
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
import sys
import time
from pathlib import Path

from bench.common import Context, Row, s3_with_bucket, spawn_quiet
from daemon.notices.imds import INSTANCE_ACTION_PATH
from daemon.standins.demo import write_config
from daemon.standins.emulator import MetadataEmulator

POLL_INTERVAL = 1.0  # ours, by default
SEED_INTERVAL = 5.0  # the seed's; ours is also measured at it

# Stamps the wall clock when SIGTERM arrives, then exits 0 (no checkpoint: not measured here).
TRAINER = """
import signal, sys, time
out = sys.argv[1]
def on_term(*_):
    open(out, "w").write(repr(time.time()))
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(out + ".ready", "w").write("1")
while True:
    time.sleep(0.05)
"""


def _wait_file(path: Path, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and (text := path.read_text()):
            return text
        time.sleep(0.005)
    raise RuntimeError(f"{path} did not appear within {timeout}s")


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..1)."""
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _one_notice(
    md: MetadataEmulator, argv: list[str], stamp: Path, rng: random.Random
) -> tuple[float, float]:
    """Start ``argv`` (which runs the trainer), notice it once: (latency s, requests/poll)."""
    md.clear_notice()
    proc = spawn_quiet(argv)
    try:
        _wait_file(Path(f"{stamp}.ready"), 60)
        time.sleep(1.0)  # past start-up: the poller is in its steady state
        md.reset_stats()
        time.sleep(rng.uniform(0, SEED_INTERVAL))  # a random phase against the poll timer
        md.set_notice("terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=120))
        set_at = time.time()
        got = float(_wait_file(stamp, 30))
        stats = md.stats()
        polls = max(1, stats.count("GET", INSTANCE_ACTION_PATH))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return got - set_at, stats.total / polls


def run(ctx: Context) -> list[Row]:
    n = ctx.repeats(20, 2)
    work = Path(ctx.workdir) / "detection"
    work.mkdir(parents=True, exist_ok=True)
    trainer = work / "trainer.py"
    trainer.write_text(TRAINER)
    rng = random.Random(42)
    s3 = s3_with_bucket("bench")
    latency: dict[str, list[float]] = {"ours": [], "ours-5s": [], "seed": []}
    per_poll: dict[str, list[float]] = {"ours": [], "ours-5s": [], "seed": []}
    try:
        with MetadataEmulator() as md:
            for i in range(n):
                for way, interval in (("ours", POLL_INTERVAL), ("ours-5s", SEED_INTERVAL)):
                    stamp = work / f"{way}-{i}"
                    cfg = write_config(
                        work / f"config-{way}-{i}.toml",
                        run_id=f"detect-{way}-{i}",
                        command=[sys.executable, str(trainer), str(stamp)],
                        local_dir=work / f"ckpt-{way}-{i}",
                        remote="s3://bench/runs",
                        endpoint_url=s3.endpoint_url,
                        imds_url=md.url,
                        runtime_dir=work / f"run-{way}-{i}",
                        poll_interval=interval,
                    )
                    argv = [sys.executable, "-m", "daemon", "run", "--config", str(cfg)]
                    lat, pp = _one_notice(md, argv, stamp, rng)
                    latency[way].append(lat)
                    per_poll[way].append(pp)
                stamp = work / f"seed-{i}"
                seed = [
                    sys.executable,
                    "-m",
                    "bench.seed_baseline",
                    md.url,
                    str(SEED_INTERVAL),
                    "--",
                    sys.executable,
                    str(trainer),
                    str(stamp),
                ]
                lat, pp = _one_notice(md, seed, stamp, rng)
                latency["seed"].append(lat)
                per_poll["seed"].append(pp)
    finally:
        s3.stop()
    rows = []
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        rows.append(
            Row(
                group="detection",
                name=f"notice -> SIGTERM {label}, both polling every {SEED_INTERVAL:g} s",
                unit="s",
                ours=percentile(latency["ours-5s"], q),
                baseline=percentile(latency["seed"], q),
                baseline_name=f"seed poller, {SEED_INTERVAL:g} s, new token per poll",
                size=f"{n} notices each",
                repeats=n,
            )
        )
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        ours = percentile(latency["ours"], q)
        p99 = label == "p99"
        rows.append(
            Row(
                group="detection",
                name=f"notice -> SIGTERM {label}, ours at its default {POLL_INTERVAL:g} s",
                unit="s",
                ours=ours,
                baseline=None,
                baseline_name="none polls as often (target only)",
                size=f"{n} notices",
                repeats=n,
                target=f"<= {POLL_INTERVAL + 0.2:.1f} s" if p99 else None,
                met=(ours <= POLL_INTERVAL + 0.2) if p99 else None,
            )
        )
    rows.append(
        Row(
            group="detection",
            name="metadata requests per poll",
            unit="req",
            ours=statistics.median(per_poll["ours"] + per_poll["ours-5s"]),
            baseline=statistics.median(per_poll["seed"]),
            baseline_name="seed poller",
            size=f"{n} boots",
            repeats=n,
            target="about 1",
        )
    )
    return rows
