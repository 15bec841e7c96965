"""run.user: a real supervisor (root) runs the training command as ``nobody``.

The trainer is a shell script (``nobody`` cannot reach this Python: it lives under
/root), which reports from inside who it is, proves the checkpoint dir and what a
restore left there are its own, and reads the notice file on SIGTERM. Real processes,
no mocks; skipped where this process may not switch users.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SUPERVISOR_RUN_ID as RUN_ID

from daemon import layout, runas
from daemon.standins import FAKE_AWS_ENV, LocalS3
from daemon.standins.demo import SupervisorProcess, write_config
from daemon.standins.emulator import MetadataEmulator

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not runas.can_switch(), reason="needs root (CAP_SETUID, CAP_SETGID)"
)

TRAINER = r"""
d="$SPOT_CHECKPOINT_DIR"
echo "$(id -u) $(id -g) $HOME $USER" > "$d/whoami"
mkdir "$d/.tmp-step-000000002-probe" && echo x > "$d/.tmp-step-000000002-probe/w"
cat "$d/step-000000001/manifest.json" > /dev/null && echo yes > "$d/restored-readable"
[ -w "$d/step-000000001" ] && [ -O "$d/step-000000001/model.pt" ] && echo y > "$d/restored-owned"
trap 'cat "$SPOT_NOTICE_FILE" > "$d/notice-seen"; exit 0' TERM
echo trainer-ready
while :; do sleep 0.1; done
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A dir ``nobody`` can reach (pytest's tmp_path sits under a 0700 dir)."""
    d = Path(tempfile.mkdtemp(prefix="spot-runuser-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def config(base: Path, s3: LocalS3, bucket: str, imds_url: str, user: str) -> Path:
    return write_config(
        base / "config.toml",
        run_id=RUN_ID,
        command=["/bin/sh", "-c", TRAINER],
        local_dir=base / "ckpt",
        remote=f"s3://{bucket}/runs",
        endpoint_url=s3.endpoint_url,
        imds_url=imds_url,
        runtime_dir=base / "run",
        poll_interval=0.2,
        extra={"run": {"user": user}},
    )


def test_trainer_runs_as_run_user_and_owns_the_checkpoint_dir(
    shared_dir: Path, s3_server: LocalS3, bucket: str, emulator: MetadataEmulator
) -> None:
    nobody = runas.resolve("nobody")
    # What a restore leaves: root's, and private under a strict umask.
    old = os.umask(0o077)
    try:
        with layout.CheckpointWriter(shared_dir / "ckpt", RUN_ID, 1, "periodic") as w:
            w.add_bytes("model.pt", b"weights")
            w.commit()
    finally:
        os.umask(old)
    cfg = config(shared_dir, s3_server, bucket, emulator.url, "nobody")
    env = {**os.environ, **FAKE_AWS_ENV, "PYTHONUNBUFFERED": "1"}
    sup = SupervisorProcess(cfg, env).start()
    try:
        sup.wait_for_line("trainer-ready", 60)
        # Waited for, not looked up: the trainer shares the supervisor's stdout, and its
        # line can come before the supervisor's event that it started.
        started = sup.wait_for(lambda e: e.get("event") == "child_started", 30, "child_started")
        assert started["user"] == "nobody"
        assert sup.proc is not None
        sup.proc.send_signal(signal.SIGTERM)  # what `systemctl stop` does
        assert sup.wait_exit(60) == 0
    finally:
        if sup.proc is not None and sup.proc.poll() is None:
            sup.proc.kill()
    ckpt = shared_dir / "ckpt"
    uid, gid, home, user = (ckpt / "whoami").read_text().split()
    assert (int(uid), int(gid), home, user) == (nobody.uid, nobody.gid, nobody.home, "nobody")
    assert ckpt.stat().st_uid == nobody.uid
    assert (ckpt / ".tmp-step-000000002-probe" / "w").stat().st_uid == nobody.uid
    # It can read what the restore left and prune it (its own now, not root's).
    assert (ckpt / "restored-readable").exists() and (ckpt / "restored-owned").exists()
    notice = json.loads((ckpt / "notice-seen").read_text())
    assert notice["action"] == "shutdown" and notice["source"] == "signal"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **FAKE_AWS_ENV},
    )


def test_unknown_run_user_exits_2_naming_the_key(
    shared_dir: Path, s3_server: LocalS3, bucket: str
) -> None:
    cfg = config(shared_dir, s3_server, bucket, "http://127.0.0.1:9", "no-such-user-7f3a")
    r = run_cli("run", "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "configuration error: run.user: no user 'no-such-user-7f3a'" in r.stderr
    assert not (shared_dir / "ckpt").exists()  # refused before anything was touched
