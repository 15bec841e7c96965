"""The deadline engine: wall clock to monotonic, the EWMA, the drain plan and its numbers;
and the [s3] transfer keys of the config."""

from __future__ import annotations

import datetime as dt

import pytest

from daemon import config
from daemon.deadline import (
    DEFAULT_THROUGHPUT_BPS,
    ThroughputEstimate,
    plan_drain,
    wall_to_monotonic,
)


def test_notice_time_becomes_a_monotonic_deadline() -> None:
    when = dt.datetime(2026, 11, 28, 9, 2, 0, tzinfo=dt.timezone.utc)
    now_wall = when.timestamp() - 120.0
    assert wall_to_monotonic(when, now_wall=now_wall, now_mono=1000.0) == pytest.approx(1120.0)
    # A notice already in the past stays in the past.
    assert wall_to_monotonic(when, now_wall=now_wall + 200, now_mono=1000.0) < 1000.0


def test_ewma_starts_at_the_first_sample_and_ignores_tiny_uploads() -> None:
    t = ThroughputEstimate()
    assert not t.measured and t.bytes_per_second == DEFAULT_THROUGHPUT_BPS
    t.record(500_000, 0.001)  # latency, not bandwidth
    assert not t.measured
    t.record(100_000_000, 1.0)
    assert t.measured and t.bytes_per_second == pytest.approx(100e6)
    t.record(200_000_000, 1.0)
    assert t.bytes_per_second == pytest.approx(0.3 * 200e6 + 0.7 * 100e6)
    assert t.seconds_for(130_000_000) == pytest.approx(1.0)


def test_drain_plan_works_back_from_the_notice() -> None:
    t = ThroughputEstimate()
    t.record(200_000_000, 1.0)  # 200 MB/s
    plan = plan_drain(
        notice_deadline=1120.0,
        safety_margin=5.0,
        reserve_bytes=2_000_000_000,
        throughput=t,
        now=1000.0,
    )
    assert plan.upload_reserve == pytest.approx(10.0)
    assert plan.drain_deadline == pytest.approx(1120.0 - 5.0 - 10.0)
    assert plan.cancel_deadline == pytest.approx(1115.0)
    fields = plan.as_fields(now=1000.0)
    assert fields == {
        "notice_in_s": 120.0,
        "drain_in_s": 105.0,
        "cancel_in_s": 115.0,
        "safety_margin_s": 5.0,
        "upload_reserve_s": 10.0,
        "reserve_bytes": 2_000_000_000,
        "throughput_mbps": 200.0,
        "throughput_measured": True,
        "reserve_capped": False,
    }
    assert plan.seconds_left(now=1110.0) == pytest.approx(-5.0)
    assert plan.cancel_in(now=1100.0) == pytest.approx(15.0)


def test_a_large_checkpoint_never_leaves_the_trainer_no_time_to_save_locally() -> None:
    """Defect: with no upload measured (50 MB/s assumed), a 10 GB checkpoint wanted a 200 s
    reserve; against `systemctl stop`'s 90 s budget the drain deadline was already past,
    and a trainer that could have saved to local disk was SIGKILLed at once."""
    stop = plan_drain(1000.0 + 90, 5.0, 10_000_000_000, ThroughputEstimate(), now=1000.0)
    assert not stop.throughput_measured and stop.reserve_capped
    # Half of the time before the cancel deadline is the trainer's, whatever the reserve.
    assert stop.seconds_left(now=1000.0) == pytest.approx(42.5)
    assert stop.upload_reserve == pytest.approx(42.5)
    notice = plan_drain(1000.0 + 30, 5.0, 10_000_000_000, ThroughputEstimate(), now=1000.0)
    assert notice.seconds_left(now=1000.0) == pytest.approx(12.5) and notice.reserve_capped
    # A reserve that fits is not touched.
    small = plan_drain(1000.0 + 90, 5.0, 500_000_000, ThroughputEstimate(), now=1000.0)
    assert not small.reserve_capped and small.upload_reserve == pytest.approx(10.0)
    # A notice already past: no time for anyone, and no negative reserve.
    past = plan_drain(990.0, 5.0, 10_000_000_000, ThroughputEstimate(), now=1000.0)
    assert past.upload_reserve == 0.0 and past.seconds_left(now=1000.0) < 0


BASE = {
    "run": {"id": "r", "command": ["python", "train.py"]},
    "checkpoints": {"local_dir": "/tmp/ckpt", "remote": "s3://bucket/p"},
}


def test_s3_transfer_keys_default_and_validate() -> None:
    cfg = config.build(BASE)
    assert (cfg.s3.part_size_mb, cfg.s3.max_concurrency) == (16, 32)
    cfg = config.build({**BASE, "s3": {"part_size_mb": 64, "max_concurrency": 8}})
    assert (cfg.s3.part_size_mb, cfg.s3.max_concurrency) == (64, 8)
    with pytest.raises(config.ConfigError, match=r"s3\.part_size_mb: 4 must be between 5 and 5120"):
        config.build({**BASE, "s3": {"part_size_mb": 4}})
    with pytest.raises(config.ConfigError, match=r"s3\.max_concurrency: expected an integer"):
        config.build({**BASE, "s3": {"max_concurrency": "many"}})
    env = {"SPOT_SUPERVISOR_S3_MAX_CONCURRENCY": "0"}
    with pytest.raises(
        config.ConfigError, match=r"s3\.max_concurrency: 0 must be between 1 and 64"
    ):
        config.build(BASE, env)
