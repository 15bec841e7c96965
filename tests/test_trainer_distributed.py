"""The reference trainer under ``torchrun`` with two ranks (gloo on CPU), real signals.

SIGTERM goes to one rank's process only; the per-step all_reduce makes both ranks stop
and save the same step. Each checkpoint holds both ranks' RNG files and one manifest
(rank 0's) listing them; resumed, the run ends with the parameters of a run never
interrupted (the DDP gradients average over both ranks, whose dropout streams differ,
so a rank that restored the wrong RNG state would change them).
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from test_trainer_harness import FINAL_RE, START_RE, STOPPED_RE, Trainer, reasons, tmp_dirs

from daemon.layout import list_step_dirs, load_complete

pytestmark = pytest.mark.slow

ARGS = ["--steps", "24", "--save-every", "5", "--seed", "5", "--state-mb", "2", "--shard-mb", "1"]


def _stop_one_rank(ckpt_dir: Path, rank: int, after: int) -> int:
    """Start (or resume), SIGTERM only ``rank``'s process after step ``after``; the stop step."""
    t = Trainer(ckpt_dir, *ARGS, "--step-seconds", "0.05", ranks=2)
    try:
        start = t.wait_for(START_RE, timeout=120)
        assert int(start[1] or 0) < after
        t.wait_for(re.compile(rf"^step={after} loss="))
        os.kill(t.rank_pid(rank), signal.SIGTERM)  # that rank only, not torchrun
        stop = int(t.wait_for(STOPPED_RE)[1])
        assert t.finish(timeout=120) == 0, t.report()
    finally:
        t.kill()
    assert stop >= after
    newest = max(reasons(ckpt_dir))
    assert newest == stop, t.report()
    manifest = load_complete(ckpt_dir / f"step-{stop:09d}")
    names = {f.path for f in manifest.files}
    # Both ranks' RNG, one manifest (rank 0's) listing every rank's files, shards too.
    assert {"rng.pt", "rng-rank00001.pt", "model.pt", "ballast-00000.pt"} <= names, names
    assert manifest.extra["world_size"] == 2
    assert manifest.reason == "interrupt"
    assert tmp_dirs(ckpt_dir) == []
    return stop


def test_two_ranks_stop_together_and_resume_exactly(tmp_path: Path) -> None:
    reference = Trainer(tmp_path / "reference", *ARGS, ranks=2)
    try:
        ckpt_dir = tmp_path / "interrupted"
        # Rank 1 is signalled: not the one that writes the manifest, nor the one printing.
        stopped = _stop_one_rank(ckpt_dir, rank=1, after=7)
        expected = reference.wait_for(FINAL_RE, timeout=180)[1]
        assert reference.finish(timeout=60) == 0, reference.report()
    finally:
        reference.kill()
    last = Trainer(ckpt_dir, *ARGS, ranks=2)
    try:
        assert int(last.wait_for(START_RE, timeout=120)[1]) == stopped
        final = last.wait_for(FINAL_RE, timeout=120)[1]
        assert last.finish(timeout=60) == 0, last.report()
    finally:
        last.kill()
    assert final == expected
    assert reasons(ckpt_dir)[24] == "final"
    assert len(list_step_dirs(ckpt_dir)) == 3
