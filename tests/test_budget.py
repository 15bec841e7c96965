"""The 30-second budget: does the newest checkpoint upload within a cloud's notice, what
the drain does when it does not, and the advice on how often to save."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon import layout
from daemon.budget import (
    Cadence,
    advise,
    cadence_of,
    emergency_decision,
    local_cadence,
    notice_budget,
)
from daemon.notices import PROVIDER_NOTICE_S

GB = 1_000_000_000


def test_notice_lengths_per_cloud() -> None:
    assert PROVIDER_NOTICE_S == {"aws": 120.0, "gcp": 30.0, "azure": 30.0}


def test_a_checkpoint_that_fits() -> None:
    b = notice_budget("gcp", 30, 1 * GB, 200e6, 5)
    assert b.fits and b.upload_s == 5.0 and b.available_s == 25.0 and not b.advice
    assert b.describe().endswith(": fits")


def test_too_large_for_30_s_advises_saving_more_often() -> None:
    # 12 GB at the default 50 MB/s: 240 s; the trainer saves every 500 steps (2400 s).
    b = notice_budget("gcp", 30, 12 * GB, None, 5, Cadence(500, 2400.0))
    assert not b.fits and not b.measured and round(b.upload_s) == 240
    assert "save every 100 steps instead of 500" in b.advice
    assert "does NOT fit" in b.describe() and "default guess" in b.describe()
    fields = b.fields()
    assert fields["fits"] is False and fields["notice_s"] == 30 and fields["upload_s"] == 240.0
    # The same checkpoint fits AWS's two minutes at 1 GB/s measured.
    assert notice_budget("aws", 120, 12 * GB, 1e9, 5).fits


def test_advice_when_saving_is_already_as_often_as_uploads_allow() -> None:
    text = advise(100.0, Cadence(10, 30.0))
    assert "already as often" in text and "smaller" in text
    assert "every ~200 s" in advise(100.0, Cadence())  # no cadence known: in seconds


def test_the_drain_skips_only_on_a_measured_speed() -> None:
    measured = emergency_decision("gcp", 30, 5 * GB, 100e6, True, 25.0)
    assert not measured.commit and measured.budget.upload_s == 50.0
    assert "newest periodic commit stands" in measured.why
    guessed = emergency_decision("gcp", 30, 5 * GB, 50e6, False, 25.0)
    assert guessed.commit and "default guess" in guessed.why
    assert emergency_decision("gcp", 30, 1 * GB, 100e6, True, 25.0).commit


def test_cadence_from_the_two_newest_checkpoints(tmp_path: Path) -> None:
    for step in (100, 200):
        with layout.CheckpointWriter(tmp_path, "r", step, "periodic") as w:
            w.add_bytes("w", b"x")
            w.commit()
    cadence = local_cadence(tmp_path)
    assert cadence.steps_between == 100
    m = [layout.read_manifest(tmp_path / layout.step_dir_name(s)) for s in (200, 100)]
    newer = layout.Manifest(m[0].run_id, 200, "2026-01-01T00:10:00Z", "periodic", m[0].files)
    older = layout.Manifest(m[1].run_id, 100, "2026-01-01T00:00:00Z", "periodic", m[1].files)
    c = cadence_of([newer, older])
    assert c.steps_between == 100 and c.seconds_between == 600 and c.seconds_per_step == 6.0
    assert cadence_of([newer]) == Cadence()


def test_demo_refuses_an_unknown_cloud() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "daemon", "demo", "--cloud", "oracle"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--cloud" in r.stderr
