"""CheckpointManager in-process: roundtrip, pruning, skipping bad checkpoints, safe loading.

Real torch objects and real files throughout; signal handling is off here (the
handlers belong to the trainer's process; test_trainer_process.py sends real signals).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import random
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from daemon.layout import CheckpointWriter, list_step_dirs, load_complete
from trainer import CheckpointError, CheckpointManager, notice_deadline, read_notice

LOGGER = "trainer.checkpoint"


def _parts(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _manager(d: Path, **kw: Any) -> CheckpointManager:
    return CheckpointManager(d, run_id="test", handle_signals=False, **kw)


def _save_steps(d: Path, steps: range, keep: int | None = None) -> CheckpointManager:
    ckpt = _manager(d, keep=keep)
    model, opt, sched = _parts(0)
    ckpt.track(model=model, optimizer=opt, scheduler=sched)
    for step in steps:
        _train(model, opt, sched, 1)
        ckpt.save(step, ckpt.snapshot(step, epoch=step), "periodic")
    return ckpt


def test_roundtrip_restores_model_optimizer_scheduler_rng_and_progress(tmp_path: Path) -> None:
    model, opt, sched = _parts(0)
    _train(model, opt, sched, 3)
    ckpt = _manager(tmp_path)
    ckpt.track(model=model, optimizer=opt, scheduler=sched)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    np.random.randn()  # leave a cached Gaussian in NumPy's state too
    manifest = ckpt.save(3, ckpt.snapshot(3, epoch=1, index=7), "requested")
    expected_draws = _draws()
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_sched = sched.state_dict()
    assert sorted(f.path for f in manifest.files) == [
        "model.pt",
        "optimizer.pt",
        "progress.pt",
        "rng.pt",
        "scheduler.pt",
    ]
    ckpt.close()

    # A fresh process would build different objects and RNG states; restore fixes all.
    model2, opt2, sched2 = _parts(99)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt2 = _manager(tmp_path)
    resume = ckpt2.restore(model2, opt2, sched2)
    assert (resume.step, resume.reason, resume.resumed) == (3, "requested", True)
    assert resume.progress == {"epoch": 1, "index": 7}
    assert ckpt2.latest_step == 3
    assert _draws() == expected_draws
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_model[k]), k
    assert sched2.state_dict() == expected_sched
    for (a, sa), (b, sb) in zip(opt.state.items(), opt2.state.items(), strict=True):
        assert a.shape == b.shape
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    # Continuing from the restored state gives the same numbers as continuing the original.
    torch.manual_seed(5)
    _train(model, opt, sched, 2)
    torch.manual_seed(5)
    _train(model2, opt2, sched2, 2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_restore_with_no_checkpoint_starts_at_zero(tmp_path: Path) -> None:
    model, opt, sched = _parts(0)
    resume = _manager(tmp_path / "new").restore(model, opt, sched)
    assert (resume.step, resume.progress, resume.resumed) == (0, {}, False)


def test_restore_names_a_missing_file(tmp_path: Path) -> None:
    _save_steps(tmp_path, range(1, 2))
    model, opt, _ = _parts(0)
    extra = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"has no head\.pt"):
        _manager(tmp_path).restore(model, opt, head=extra)


def test_keep_prunes_all_but_the_newest_complete(tmp_path: Path) -> None:
    _save_steps(tmp_path, range(1, 6), keep=2)
    assert [s for s, _ in list_step_dirs(tmp_path)] == [5, 4]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_broken_checkpoint_does_not_count_toward_keep(tmp_path: Path) -> None:
    ckpt = _save_steps(tmp_path, range(1, 4), keep=2)
    with open(tmp_path / "step-000000003" / "model.pt", "r+b") as f:
        f.truncate(10)
    model, opt, sched = _parts(1)
    ckpt = _manager(tmp_path, keep=2)
    ckpt.track(model=model, optimizer=opt, scheduler=sched)
    ckpt.save(4, ckpt.snapshot(4), "periodic")
    # 4 and 2 are the two complete ones; the broken 3 sits between them, 1 goes.
    assert [s for s, _ in list_step_dirs(tmp_path)] == [4, 3, 2]


def test_truncated_and_sha_mismatched_checkpoints_are_skipped_with_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save_steps(tmp_path, range(1, 4))
    with open(tmp_path / "step-000000003" / "model.pt", "r+b") as f:
        f.truncate(f.seek(0, io.SEEK_END) // 2)
    with open(tmp_path / "step-000000002" / "optimizer.pt", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))  # same size, one bit pattern flipped

    caplog.set_level(logging.WARNING, logger=LOGGER)
    model, opt, sched = _parts(7)
    resume = _manager(tmp_path).restore(model, opt, sched)
    assert resume.step == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "step-000000003" in warnings[0] and "model.pt has" in warnings[0]
    assert (
        "step-000000002" in warnings[1] and "optimizer.pt does not match its sha256" in warnings[1]
    )


def test_a_file_torch_cannot_load_is_skipped_and_its_step_rewritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save_steps(tmp_path, range(1, 2))
    # Step 2 verifies (its manifest matches the bytes) but the bytes are not a torch file.
    with CheckpointWriter(tmp_path, "test", 2, "periodic") as w:
        w.add_bytes("model.pt", b"definitely not a zip archive")
        w.commit()

    caplog.set_level(logging.WARNING, logger=LOGGER)
    model, opt, sched = _parts(7)
    ckpt = _manager(tmp_path)
    assert ckpt.restore(model, opt, sched).step == 1
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "step-000000002" in warning and "model.pt could not be loaded" in warning

    # Reaching step 2 again replaces the unloadable directory instead of trusting it.
    ckpt.save(2, ckpt.snapshot(2), "periodic")
    assert load_complete(tmp_path / "step-000000002").total_bytes > 100
    assert _manager(tmp_path).restore(*_parts(8)).step == 2


class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_malicious_pickle_is_refused_and_never_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # First prove the payload is live: a plain unpickle does run it.
    probe = tmp_path / "probe-ran"
    buf = io.BytesIO()
    torch.save({"weight": _Payload(probe)}, buf)
    buf.seek(0)
    torch.load(buf, weights_only=False)
    assert probe.exists()

    ckdir = tmp_path / "ckpt"
    _save_steps(ckdir, range(1, 2))
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save({"weight": _Payload(marker)}, evil)
    with CheckpointWriter(ckdir, "test", 2, "periodic") as w:
        w.add_bytes("model.pt", evil.getvalue())  # valid manifest, valid sha256
        w.commit()

    caplog.set_level(logging.WARNING, logger=LOGGER)
    resume = _manager(ckdir).restore(*_parts(3))
    assert resume.step == 1
    assert not marker.exists()
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "step-000000002" in warning and "model.pt could not be loaded" in warning


def test_state_torch_could_not_load_safely_is_refused_at_save(tmp_path: Path) -> None:
    ckpt = _manager(tmp_path)
    with pytest.raises(TypeError, match=r"progress\['when'\] is a datetime.datetime"):
        ckpt.save(1, {"progress": {"when": dt.datetime.now()}}, "periodic")
    with pytest.raises(TypeError, match=r"extra\[0\] is a .*_Payload"):
        ckpt.save(1, {"extra": [_Payload(tmp_path / "x")]}, "periodic")
    with pytest.raises(ValueError, match="cannot name a checkpoint file"):
        ckpt.save(1, {"../model": {}}, "periodic")
    assert list(tmp_path.iterdir()) == []


def test_step_done_saves_periodic_final_and_nothing_twice(tmp_path: Path) -> None:
    saved: list[tuple[int, str]] = []
    ckpt = _manager(tmp_path, save_every=3, on_save=lambda m: saved.append((m.step, m.reason)))
    model, opt, sched = _parts(0)
    ckpt.restore(model, opt, sched)
    assert not ckpt.step_done(0)  # the starting boundary: nothing to save
    for step in range(1, 7):
        assert ckpt.step_done(step) is False
    ckpt.request_save()
    assert ckpt.step_done(6) is False  # already saved at 6: the request is answered
    ckpt.request_save()
    assert ckpt.step_done(7) is False
    assert ckpt.step_done(9, final=True) is True
    assert saved == [(3, "periodic"), (6, "periodic"), (7, "requested"), (9, "final")]
    ckpt.request_stop()
    assert ckpt.step_done(9) is True  # stop at a saved step: nothing new
    assert saved[-1] == (9, "final")
    ckpt.request_save()
    assert ckpt.step_done(10) is True
    assert saved[-1] == (10, "interrupt")  # both signals: SIGTERM names the save


def test_stale_tmp_dir_with_our_own_pid_is_removed(tmp_path: Path) -> None:
    # A container restarts processes with the same small pids: a dead writer's directory
    # can carry the new process's pid.
    stale = tmp_path / f".tmp-step-000000004-{os.getpid()}-dead"
    stale.mkdir()
    (stale / "model.pt.partial").write_bytes(b"half")
    foreign = tmp_path / ".tmp-step-000000004-notapid"
    foreign.mkdir()
    _manager(tmp_path)
    assert not stale.exists()
    assert foreign.exists()  # not our naming: not ours to delete


def test_notice_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notice = tmp_path / "notice.json"
    monkeypatch.setenv("SPOT_NOTICE_FILE", str(notice))
    assert notice_deadline() is None  # no file yet
    notice.write_text("{half")
    assert notice_deadline() is None
    notice.write_text(json.dumps({"action": "terminate", "deadline": "soon", "source": "x"}))
    assert notice_deadline() is None
    doc = {"action": "terminate", "deadline": "2026-11-28T09:02:00Z", "source": "aws-imds"}
    notice.write_text(json.dumps(doc))
    expected = dt.datetime(2026, 11, 28, 9, 2, tzinfo=dt.timezone.utc)
    assert notice_deadline() == expected
    parsed = read_notice()
    assert parsed is not None and (parsed.action, parsed.source) == ("terminate", "aws-imds")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"deadline": "2026-11-28T10:02:00+01:00"}))
    assert notice_deadline(other) == expected
    monkeypatch.delenv("SPOT_NOTICE_FILE")
    assert notice_deadline() is None


def test_directory_defaults_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPOT_CHECKPOINT_DIR", raising=False)
    with pytest.raises(CheckpointError, match="SPOT_CHECKPOINT_DIR"):
        CheckpointManager(handle_signals=False)
    monkeypatch.setenv("SPOT_CHECKPOINT_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("SPOT_RUN_ID", "from-env")
    ckpt = CheckpointManager(handle_signals=False)
    assert ckpt.directory == tmp_path / "env" and ckpt.run_id == "from-env"
    manifest = ckpt.save(1, {"progress": {"step": 1}}, "periodic")
    assert manifest.run_id == "from-env"
    monkeypatch.delenv("SPOT_RUN_ID")
    assert CheckpointManager(handle_signals=False).run_id == "local"
