"""The Accelerate recipe (python -m trainer.example_accelerate): CheckpointManager with
save_dir=accelerator.save_state, load_state + skip_first_batches on resume.

SIGTERM mid-epoch, then at an epoch's last step; each resume ends where a run never
interrupted ends, bit for bit; each checkpoint is Accelerate's own files plus our
progress.pt, listed in a manifest, with no staging or temporary directory left behind.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

from followed import START_RE, STEP_RE, STOPPED_RE
from integration_runs import Script, final_hash

from daemon.layout import list_step_dirs, load_complete

MODULE = "trainer.example_accelerate"
ARGS = ("--steps", "24", "--save-every", "10")


def _stop_after(ckpt: Path, after: int) -> int:
    """Start (or resume), SIGTERM after step ``after``'s line; the step it stopped at."""
    s = Script(MODULE, ckpt, *ARGS, "--step-seconds", "0.1")
    try:
        s.wait_for(START_RE)
        while int(s.wait_for(STEP_RE)[1]) < after:
            pass
        s.proc.send_signal(signal.SIGTERM)
        stopped = int(s.wait_for(STOPPED_RE)[1])
        assert s.finish() == 0, s.report()
    finally:
        s.kill()
    assert (stopped, "interrupt") in s.saved(), s.report()
    return stopped


def test_recipe_resumes_exactly(tmp_path: Path) -> None:
    reference = Script(MODULE, tmp_path / "reference", *ARGS)
    ckpt = tmp_path / "interrupted"
    first = _stop_after(ckpt, 5)  # mid-epoch (16 steps an epoch)
    second = _stop_after(ckpt, 16)  # the epoch's last step (or just past it)
    assert first < second
    manifest = load_complete(ckpt / f"step-{second:09d}")
    names = {f.path for f in manifest.files}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "progress.pt"} <= names
    assert "random_states_0.pkl" in names
    assert manifest.reason == "interrupt"
    resumed = Script(MODULE, ckpt, *ARGS)
    assert final_hash(resumed) == final_hash(reference)
    assert list_step_dirs(ckpt)[0][0] == 24
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(".tmp-")]
