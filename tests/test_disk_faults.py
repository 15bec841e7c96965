"""Disk faults with real processes, real files and moto over HTTP.

* a full local dir (a 3 MiB tmpfs): the trainer's save fails with a clear message, the
  previous checkpoint stays complete locally and committed remotely;
* a read-only local dir (a tmpfs remounted read-only: root ignores chmod): the trainer,
  ``check`` and a restore say so clearly;
* a local checkpoint corrupted after it was committed: restore treats it as absent and
  downloads the remote copy.

Mounting needs root (and a kernel that lets this container mount); the tests that
need a mount skip with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.layout import list_step_dirs, load_complete
from daemon.standins import FAKE_AWS_ENV, LocalS3
from daemon.standins.demo import SupervisorProcess, trainer_command, write_config
from daemon.standins.emulator import MetadataEmulator

pytestmark = pytest.mark.slow

RUN_ID = "disk-run"
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, **FAKE_AWS_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
Mount = Callable[..., Path]


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """Mount a small tmpfs (as root); unmounted at teardown. Skips when it cannot."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "3m") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        r = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount_read_only(path: Path) -> None:
    r = subprocess.run(
        ["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True, timeout=30
    )
    if r.returncode != 0:
        pytest.skip(f"cannot remount {path} read-only: {r.stderr.strip()}")
    probe = path / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return
    probe.unlink()
    pytest.skip(f"{path} is still writable after a read-only remount")


def read_only_local_dir(mount_tmpfs: Mount) -> Path:
    """An empty local dir on a tmpfs remounted read-only (skips when that cannot be)."""
    nvme = mount_tmpfs("nvme", "8m")
    local = nvme / "checkpoints"
    local.mkdir()
    remount_read_only(nvme)
    return local


def config(
    tmp_path: Path,
    s3_server: LocalS3,
    bucket: str,
    emulator: MetadataEmulator,
    local_dir: Path,
    command: list[str],
    name: str = "config.toml",
    **daemon: Any,
) -> Path:
    return write_config(
        tmp_path / name,
        run_id=RUN_ID,
        command=command,
        local_dir=local_dir,
        remote=f"s3://{bucket}/runs",
        endpoint_url=s3_server.endpoint_url,
        imds_url=emulator.url,
        runtime_dir=tmp_path / f"run-{name}",
        poll_interval=0.2,
        extra={"daemon": daemon},
    )


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def run_to_exit(cfg: Path, timeout: float) -> tuple[SupervisorProcess, int]:
    """A supervisor run with ``cfg`` until it exits (killed if it outlives ``timeout``):
    the process, for its lines and events, and its exit status."""
    sup = SupervisorProcess(cfg, ENV).start()
    try:
        code = sup.wait_exit(timeout)
    finally:
        if sup.proc is not None and sup.proc.poll() is None:
            sup.proc.kill()
    return sup, code


def remote_manifests(s3_client: Any, bucket: str) -> dict[int, dict[str, Any]]:
    """Committed checkpoints, read and hashed independently of the daemon's code."""
    prefix = f"runs/{RUN_ID}/checkpoints/"
    resp = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    found: dict[int, dict[str, Any]] = {}
    for obj in resp.get("Contents", []):
        key = obj["Key"]
        if not key.endswith("/manifest.json"):
            continue
        doc = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
        base = key[: -len("manifest.json")]
        for f in doc["files"]:
            body = s3_client.get_object(Bucket=bucket, Key=base + f["path"])["Body"].read()
            assert len(body) == f["size"] and hashlib.sha256(body).hexdigest() == f["sha256"]
        found[doc["step"]] = doc
    return found


def make_checkpoint(local_dir: Path, step: int, files: dict[str, bytes]) -> Path:
    """A complete checkpoint as CONTRACT §4 has writers build it."""
    local_dir.mkdir(parents=True, exist_ok=True)
    tmp = local_dir / f".tmp-step-{step:09d}-test"
    tmp.mkdir()
    entries = []
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        entries.append(
            {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    manifest = {
        "format": "spot-checkpoint/1",
        "run_id": RUN_ID,
        "step": step,
        "created_at": "2026-11-28T09:00:00Z",
        "reason": "periodic",
        "files": entries,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    final = local_dir / f"step-{step:09d}"
    tmp.rename(final)
    return final


# -- a full disk ------------------------------------------------------------------------


def test_full_local_dir_fails_the_save_cleanly_and_keeps_the_previous_checkpoint(
    tmp_path: Path,
    s3_server: LocalS3,
    s3_client: Any,
    bucket: str,
    emulator: MetadataEmulator,
    mount_tmpfs: Mount,
) -> None:
    """Checkpoints of ~1.1 MiB on a 3 MiB tmpfs: the third save runs out of space."""
    nvme = mount_tmpfs("nvme", "3m")
    local = nvme / "checkpoints"
    cmd = trainer_command(steps=40, save_every=4, step_seconds=0.05, state_mb=1)
    cfg = config(tmp_path, s3_server, bucket, emulator, local, cmd, max_restarts=1)
    sup, code = run_to_exit(cfg, 180)
    out = "\n".join(sup.lines)
    # The trainer says which save failed, in one line, leaves nothing of it, exits non-zero.
    # (The error line names the full disk: the test below.)
    errors = [ln for ln in sup.lines if ln.startswith("error:")]
    assert errors, out[-3000:]
    assert all("save of checkpoint" in ln and "nothing was written" in ln for ln in errors)
    assert not [p for p in local.iterdir() if p.name.startswith(".tmp-")]
    exits = sup.find("child_exited")
    assert exits and all(e["returncode"] == 1 for e in exits), out[-3000:]
    # The supervisor restarted it once, then gave up, after committing what is complete.
    gave_up = sup.find("supervisor_gave_up")
    assert code == 1 and gave_up, out[-3000:]
    # The previous checkpoint is complete locally (every sha256 checks out) ...
    steps = [s for s, _ in list_step_dirs(local)]
    assert steps, out[-3000:]
    newest = steps[0]
    for step, path in list_step_dirs(local):
        assert load_complete(path).step == step
    # ... and committed remotely, byte for byte.
    remote = remote_manifests(s3_client, bucket)
    assert max(remote) == newest == gave_up[0]["committed_step"]
    local_manifest = json.loads((local / f"step-{newest:09d}" / "manifest.json").read_text())
    assert remote[newest]["files"] == local_manifest["files"]


def test_full_local_dir_error_line_says_no_space_left(tmp_path: Path, mount_tmpfs: Mount) -> None:
    nvme = mount_tmpfs("nvme", "3m")
    r = subprocess.run(
        [
            *trainer_command(steps=12, save_every=4, step_seconds=0.0, state_mb=1),
            "--checkpoint-dir",
            str(nvme / "checkpoints"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=ENV,
    )
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and errors, r.stdout[-2000:] + r.stderr[-2000:]
    assert "No space left on device" in errors[0], errors[0]


# -- a read-only disk ---------------------------------------------------------------------


def test_read_only_local_dir_is_reported_clearly(
    tmp_path: Path,
    s3_server: LocalS3,
    bucket: str,
    emulator: MetadataEmulator,
    mount_tmpfs: Mount,
) -> None:
    local = read_only_local_dir(mount_tmpfs)
    cmd = trainer_command(steps=20, save_every=4, step_seconds=0.0, state_mb=0)
    cfg = config(tmp_path, s3_server, bucket, emulator, local, cmd, max_restarts=0)

    # Preflight names the directory and the reason.
    r = cli("check", "--config", str(cfg))
    assert r.returncode != 0, r.stdout + r.stderr
    assert f"{local} is not writable: Read-only file system" in r.stdout + r.stderr

    # The daemon: the trainer cannot save; it says so, and the supervisor gives up.
    sup, code = run_to_exit(cfg, 120)
    out = "\n".join(sup.lines)
    errors = [ln for ln in sup.lines if ln.startswith("error:")]
    assert errors and "Read-only file system" in errors[0], out[-3000:]
    assert code == 1 and sup.find("supervisor_gave_up"), out[-3000:]


def test_restore_into_a_read_only_local_dir_fails_with_a_clear_message(
    tmp_path: Path,
    s3_server: LocalS3,
    bucket: str,
    emulator: MetadataEmulator,
    mount_tmpfs: Mount,
) -> None:
    """A committed checkpoint to restore, a local dir that cannot take it."""
    src = tmp_path / "src"
    make_checkpoint(src, 10, {"model.pt": os.urandom(4096), "opt.pt": b"opt"})
    cfg_src = config(tmp_path, s3_server, bucket, emulator, src, ["true"], "src.toml")
    r = cli("sync", "--config", str(cfg_src))
    assert r.returncode == 0, r.stdout + r.stderr

    local = read_only_local_dir(mount_tmpfs)
    cfg = config(tmp_path, s3_server, bucket, emulator, local, ["true"])
    for command in ("restore", "run"):
        r = cli(command, "--config", str(cfg))
        out = r.stdout + r.stderr
        assert r.returncode not in (0, 2), out
        assert "Read-only file system" in out and str(local) in out, out
        assert "Traceback" not in out, f"{command}: {out}"


# -- a corrupt local checkpoint -------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_file"])
def test_local_checkpoint_corrupted_after_commit_is_restored_from_remote(
    tmp_path: Path,
    s3_server: LocalS3,
    s3_client: Any,
    bucket: str,
    emulator: MetadataEmulator,
    damage: str,
) -> None:
    local = tmp_path / "nvme" / "checkpoints"
    model = os.urandom(256 * 1024)
    make_checkpoint(local, 10, {"model.pt": b"older"})
    ckpt = make_checkpoint(local, 20, {"model.pt": model, "rng.pt": b"rng-state"})
    cfg = config(tmp_path, s3_server, bucket, emulator, local, ["true"])
    r = cli("sync", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(remote_manifests(s3_client, bucket)) == {10, 20}

    # After the commit, the local copy goes bad (a bad disk, a stray write).
    victim = ckpt / "model.pt"
    if damage == "flip_byte":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        with victim.open("r+b") as f:
            f.truncate(1000)
    else:
        victim.unlink()

    r = cli("restore", "--config", str(cfg))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "restored step 20" in r.stdout, out
    assert "local_checkpoint_invalid" in out, out
    # The remote copy is in place, complete and verified; nothing of the bad one is left.
    assert load_complete(local / "step-000000020").step == 20
    assert (local / "step-000000020" / "model.pt").read_bytes() == model
    assert [s for s, _ in list_step_dirs(local)] == [20, 10]
