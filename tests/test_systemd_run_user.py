"""run.user under the shipped unit and a real systemd (tests/systemd_sandbox.py): its
CapabilityBoundingSet=, NoNewPrivileges=, UMask=0027 and RuntimeDirectory= still let the
supervisor start the trainer as ``nobody``, hand it the checkpoint dir, and let it read
the notice file. The trainer is a shell script (``nobody`` cannot reach this Python)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from test_systemd import RUN_ID, UNIT, Booted, booted, unit_for_test

from daemon import runas
from daemon.standins import FAKE_AWS_ENV
from daemon.standins.demo import write_config

__all__ = ["booted"]  # the fixture, shared with test_systemd.py

TRAINER = r"""
d="$SPOT_CHECKPOINT_DIR"
echo "$(id -u) $(id -g) $HOME" > "$d/whoami"
trap 'cat "$SPOT_NOTICE_FILE" > "$d/notice-seen"; exit 0' TERM
while :; do sleep 0.1; done
"""


def wait_for(path: Path, booted: Booted, timeout: float = 60) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"{path} never appeared; journal:\n{booted.tail()}")


@pytest.mark.systemd
def test_trainer_runs_as_run_user_under_the_shipped_unit(booted: Booted) -> None:
    ckpt = booted.work / "nvme" / "checkpoints"
    write_config(
        booted.work / "config.toml",
        run_id=RUN_ID,
        command=["/bin/sh", "-c", TRAINER],
        local_dir=ckpt,
        remote=f"s3://{booted.bucket}/runs",
        endpoint_url=booted.s3_client.meta.endpoint_url,
        imds_url=booted.emulator.url,
        runtime_dir=Path("/run/spot-supervisor"),
        poll_interval=0.2,
        extra={"run": {"user": "nobody"}, "daemon": {"stop_budget": 20}},
    )
    env = "".join(f"{k}={v}\n" for k, v in FAKE_AWS_ENV.items())
    (booted.work / "environment").write_text(env)
    booted.sandbox.install_unit(UNIT, unit_for_test(booted.work))
    booted.systemctl("start", UNIT)
    nobody = runas.resolve("nobody")
    uid, gid, home = wait_for(ckpt / "whoami", booted).split()
    assert (int(uid), int(gid), home) == (nobody.uid, nobody.gid, nobody.home)
    assert ckpt.stat().st_uid == nobody.uid
    booted.emulator.set_notice(
        "terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=10)
    )
    props = booted.wait_state(30, ActiveState="inactive")
    assert props["Result"] == "success" and props["ExecMainStatus"] == "0", props
    notice = json.loads(wait_for(ckpt / "notice-seen", booted))
    assert notice["action"] == "terminate" and notice["source"] == "aws-imds"
