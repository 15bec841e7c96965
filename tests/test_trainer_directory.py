"""CheckpointManager.save_directory: another library's checkpoint directory, committed by
a rename (CONTRACT §4), never copied; and decide(), the step-boundary decision the
framework callbacks use. No framework needed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from daemon.layout import list_step_dirs, load_complete, read_manifest
from trainer.checkpoint import CheckpointError, CheckpointManager, newest_verified


def _hf_like(root: Path, step: int) -> Path:
    """A directory as a framework leaves it: files under their final names, a sub-dir."""
    d = root / f"checkpoint-{step}"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(3000))
    (d / "optimizer.pt").write_bytes(os.urandom(500))
    (d / "sub" / "rng_state.pth").write_bytes(b"rng")
    return d


def test_a_finished_directory_is_moved_not_copied(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path / "ckpt", keep=2, handle_signals=False)
    out = tmp_path / "ckpt" / ".hf-output"
    src = _hf_like(out, 5)
    inode = (src / "model.safetensors").stat().st_ino
    saved = []
    ckpt.on_save = saved.append
    manifest = ckpt.save_directory(5, "requested", source=src)
    step_dir = tmp_path / "ckpt" / "step-000000005"
    assert not src.exists()
    # The same inode: one rename of the directory, no byte copied.
    assert (step_dir / "model.safetensors").stat().st_ino == inode
    assert load_complete(step_dir, hash_files=True) == manifest
    assert manifest.reason == "requested" and manifest.step == 5
    assert {f.path for f in manifest.files} == {
        "model.safetensors",
        "optimizer.pt",
        "sub/rng_state.pth",
    }
    assert saved == [manifest]
    assert ckpt.latest_step == 5
    assert newest_verified(tmp_path / "ckpt") == (step_dir, manifest)
    # Pruning keeps `keep` step directories.
    for step in (6, 7):
        ckpt.save_directory(step, "periodic", source=_hf_like(out, step))
    assert [s for s, _ in list_step_dirs(tmp_path / "ckpt")] == [7, 6]
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".tmp-")]


def test_a_step_already_saved_writes_nothing_and_drops_the_duplicate(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path / "ckpt", handle_signals=False)
    first = ckpt.save_directory(3, "periodic", source=_hf_like(tmp_path / "out", 3))
    again = _hf_like(tmp_path / "out2", 3)
    assert ckpt.save_directory(3, "final", source=again) == first
    assert not again.exists()
    assert read_manifest(tmp_path / "ckpt" / "step-000000003").reason == "periodic"


def test_fill_writes_into_a_staging_dir_the_supervisor_does_not_watch(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path / "ckpt", handle_signals=False)
    seen: list[str] = []

    def fill(staging: Path) -> None:
        seen.append(staging.name)
        # Not a .tmp-step-* name: files written in place here are not uploaded early.
        assert staging.name.startswith(".tmp-staging-step-000000004-")
        torch.save({"w": torch.ones(3)}, staging / "model.ckpt")

    manifest = ckpt.save_directory(4, "interrupt", fill=fill, progress={"epoch": 1})
    step_dir = tmp_path / "ckpt" / "step-000000004"
    assert {f.path for f in manifest.files} == {"model.ckpt", "progress.pt"}
    assert torch.load(step_dir / "progress.pt", weights_only=True) == {"step": 4, "epoch": 1}
    assert not (tmp_path / "ckpt" / seen[0]).exists()


def test_refused_directories_leave_no_step_dir(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path / "ckpt", handle_signals=False)
    link = _hf_like(tmp_path / "out", 1)
    (link / "escape").symlink_to("/etc/hostname")
    with pytest.raises(CheckpointError, match="symlink"):
        ckpt.save_directory(1, "periodic", source=link)

    def failing(staging: Path) -> None:
        (staging / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save_directory(2, "periodic", fill=failing)
    assert list_step_dirs(tmp_path / "ckpt") == []
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev,
    reason="needs a second filesystem",
)
def test_another_filesystem_is_an_error_not_a_copy(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path / "ckpt", handle_signals=False)
    elsewhere = Path("/dev/shm") / f"spot-test-{os.getpid()}"
    try:
        src = _hf_like(elsewhere, 9)
        with pytest.raises(CheckpointError, match="another filesystem"):
            ckpt.save_directory(9, "periodic", source=src)
        assert src.is_dir()  # left where it was
    finally:
        import shutil

        shutil.rmtree(elsewhere, ignore_errors=True)
    assert list_step_dirs(tmp_path / "ckpt") == []


def test_staging_dirs_of_dead_writers_are_swept(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    stale = d / ".tmp-staging-step-000000007-999999999-abcd"
    stale.mkdir(parents=True)
    (stale / "model.ckpt").write_bytes(b"x")
    CheckpointManager(d, handle_signals=False)
    assert not stale.exists()


def test_decide_reasons_and_the_saved_step(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path / "ckpt", save_every=4, handle_signals=False)
    assert ckpt.decide(3).reason is None
    assert ckpt.decide(4).reason == "periodic"
    assert ckpt.decide(5, periodic=True).reason == "periodic"  # the framework's own schedule
    assert ckpt.decide(8, periodic=False).reason is None
    ckpt.request_save()
    assert ckpt.decide(6).reason == "requested"
    ckpt.mark_saved(7)
    ckpt.request_stop()
    b = ckpt.decide(7)
    assert b.stop and b.reason is None and not b.save  # that state is in a checkpoint already
    b = ckpt.decide(8, periodic=True)
    assert b.stop and b.reason == "interrupt" and b.save
    assert ckpt.decide(8, final=True).reason == "final"


def test_save_dir_mode_restores_the_path_and_progress(tmp_path: Path) -> None:
    written: list[Path] = []

    def save_state(d: Path) -> None:
        written.append(d)
        (d / "model.safetensors").write_bytes(b"weights")

    ckpt = CheckpointManager(tmp_path / "ckpt", save_every=2, save_dir=save_state)
    try:
        assert not ckpt.restore().resumed
        assert not ckpt.step_done(1, epoch=0, index=1)
        assert not ckpt.step_done(2, epoch=0, index=2)
        os.kill(os.getpid(), signal.SIGTERM)  # our handler is installed: a flag, not a kill
        assert ckpt.step_done(3, epoch=1, index=0)
    finally:
        ckpt.close()
    steps = list_step_dirs(ckpt.directory)
    assert [read_manifest(p).reason for _, p in steps] == ["interrupt", "periodic"]
    again = CheckpointManager(tmp_path / "ckpt", save_dir=save_state, handle_signals=False)
    resume = again.restore()
    assert resume.step == 3 and resume.reason == "interrupt"
    assert resume.progress == {"epoch": 1, "index": 0}
    assert resume.path == ckpt.directory / "step-000000003"
    assert again.latest_step == 3
    with pytest.raises(ValueError, match="save_dir"):
        again.restore(torch.nn.Linear(1, 1))
