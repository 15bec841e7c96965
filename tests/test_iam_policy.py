"""The shipped least-privilege IAM policy (systemd/iam-policy.json), enforced by moto.

moto's server authorizes every request against IAM once its "initial no-auth action
count" is spent. This test creates a user holding exactly the shipped policy, turns
enforcement on, and runs the daemon's whole story with that user's keys: periodic commits
with remote retention (deletes), a notice and its emergency commit, the restore on a new
instance, completion, ``check`` and ``sync``. Controls show the enforcement is real: the
unprivileged default keys and a prefix outside the policy are refused.

Two adaptations to moto's partial IAM, and nothing else:

- moto evaluates actions and resources but not condition keys such as ``s3:prefix`` (it
  treats an unevaluated condition as a denial), so the one ``Condition`` of the policy
  is removed; on AWS it narrows ListBucket to the prefix the resources already name.
- moto authorizes a multi-object delete (DeleteObjects) as ``s3:DeleteObject`` on the
  bucket's ARN before it checks each key; AWS checks only each key. So the test adds
  ``s3:DeleteObject`` on the bucket ARN, which on AWS grants nothing (no object has it).

The server runs in its own process: enforcement is a process-wide moto setting, and the
rest of the suite shares an in-process server.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from conftest import REPO, SCRIPTED_TRAINER

from daemon.standins import FAKE_AWS_ENV
from daemon.standins.demo import SupervisorProcess, write_config
from daemon.standins.emulator import MetadataEmulator

BUCKET = "iam-enforced"
PREFIX = "runs"
RUN_ID = "iam-run"
POLICY = REPO / "systemd" / "iam-policy.json"
FAILURES = {"checkpoint_upload_failed", "retention_failed", "checkpoint_verification_failed"}


def shipped_policy(bucket: str, prefix: str) -> dict[str, Any]:
    """The policy as shipped, placeholders filled, with the two adaptations to moto above."""
    text = POLICY.read_text().replace("BUCKET", bucket).replace("PREFIX", prefix)
    doc: dict[str, Any] = json.loads(text)
    conditions = [s.pop("Condition") for s in doc["Statement"] if "Condition" in s]
    # Exactly one condition, and it is the prefix narrowing moto cannot evaluate.
    assert conditions == [{"StringLike": {"s3:prefix": [f"{prefix}/*", f"{prefix}/"]}}]
    doc["Statement"].append(
        {
            "Sid": "MotoChecksDeleteObjectsAgainstTheBucket",
            "Effect": "Allow",
            "Action": "s3:DeleteObject",
            "Resource": f"arn:aws:s3:::{bucket}",
        }
    )
    return doc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EnforcingS3:
    """moto's server in a child process, with IAM enforcement switchable over HTTP."""

    def __init__(self) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
            env={**os.environ, **FAKE_AWS_ENV},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.2)

    def enforce(self) -> None:
        """Authorize every request from now on (moto's /moto-api/reset-auth)."""
        req = urllib.request.Request(
            f"{self.url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            # Not a form: werkzeug would parse a form body away from request.data.
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Enforcing:
    """The server, and the keys of users holding the shipped policy or a weaker one."""

    server: EnforcingS3
    shipped: dict[str, str]
    without_delete: dict[str, str]


def iam_user(iam: Any, name: str, policy: dict[str, Any]) -> dict[str, str]:
    """Create a user holding ``policy``; its keys, as environment variables."""
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }


@pytest.fixture(scope="module")
def enforcing() -> Iterator[Enforcing]:
    """The server, a bucket, users holding the shipped policy (and one less); enforcement on."""
    server = EnforcingS3()
    try:
        admin = {"endpoint_url": server.url, "region_name": "us-east-1"}
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **admin)
        shipped = shipped_policy(BUCKET, PREFIX)
        weaker = shipped_policy(BUCKET, PREFIX)
        for statement in weaker["Statement"]:
            actions = statement["Action"]
            if isinstance(actions, list):
                statement["Action"] = [a for a in actions if a != "s3:DeleteObject"]
        weaker["Statement"] = [s for s in weaker["Statement"] if s["Action"] != "s3:DeleteObject"]
        users = Enforcing(
            server,
            shipped=iam_user(iam, "spot-supervisor", shipped),
            without_delete=iam_user(iam, "no-delete", weaker),
        )
        server.enforce()
        yield users
    finally:
        server.stop()


def daemon_env(creds: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **FAKE_AWS_ENV, **creds, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("AWS_SESSION_TOKEN")  # a long-term IAM user key has none
    return env


def stop(sup: SupervisorProcess) -> None:
    if sup.proc is not None and sup.proc.poll() is None:
        sup.proc.kill()
        sup.proc.wait()


def refused(sup: SupervisorProcess) -> None:
    """No request of the daemon was refused, and no S3 step failed."""
    denied = [e for e in sup.events if "accessdenied" in json.dumps(e).lower().replace(" ", "")]
    failed = [e for e in sup.events if e["event"] in FAILURES]
    assert not denied and not failed, denied + failed


def config(
    tmp_path: Path,
    name: str,
    server: EnforcingS3,
    md: MetadataEmulator,
    prefix: str = PREFIX,
    run_id: str = RUN_ID,
) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        run_id=run_id,
        command=[sys.executable, SCRIPTED_TRAINER, "30", "--step-seconds", "0.1"],
        local_dir=tmp_path / name / "ckpt",
        remote=f"s3://{BUCKET}/{prefix}",
        endpoint_url=server.url,
        imds_url=md.url,
        runtime_dir=tmp_path / name / "run",
        poll_interval=0.2,
        extra={"checkpoints": {"keep_remote": 2}},
    )


def test_enforcement_is_on(enforcing: Enforcing) -> None:
    """Control: keys that are not an IAM user's are refused, the user's are accepted."""
    server, creds = enforcing.server, enforcing.shipped
    anonymous = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        anonymous.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    assert err.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    user = boto3.client(
        "s3",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
    )
    user.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        user.put_object(Bucket=BUCKET, Key="elsewhere/x", Body=b"x")
    assert err.value.response["Error"]["Code"] == "AccessDenied"


def test_the_whole_story_runs_under_the_shipped_policy(
    enforcing: Enforcing, tmp_path: Path
) -> None:
    server, creds = enforcing.server, enforcing.shipped
    env = daemon_env(creds)
    with MetadataEmulator() as md:
        cfg_a = config(tmp_path, "a", server, md)
        check = subprocess.run(
            [sys.executable, "-m", "daemon", "check", "--config", str(cfg_a)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        # Boot 1: periodic commits (retention deletes old ones), then a notice.
        boot1 = SupervisorProcess(cfg_a, env).start()
        try:
            boot1.wait_for(
                lambda e: e.get("event") == "checkpoint_committed" and e["step"] >= 5, 60, "step 5"
            )
            md.set_notice("terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=20))
            assert boot1.wait_exit(60) == 0
        finally:
            stop(boot1)
        refused(boot1)
        assert boot1.find("checkpoint_deleted"), "retention never deleted under the policy"
        step = boot1.find("emergency_committed")[0]["committed_step"]
        # Boot 2, a new instance: restore, resume, complete.
        md.clear_notice()
        boot2 = SupervisorProcess(config(tmp_path, "b", server, md), env).start()
        try:
            restored = boot2.wait_for(lambda e: e["event"] == "restore_finished", 60, "restore")
            assert restored["step"] == step
            assert boot2.wait_exit(60) == 0
        finally:
            stop(boot2)
        refused(boot2)
        assert boot2.find("run_completed")[0]["step"] == 30
        assert f"resumed step={step}" in boot2.lines
    sync = subprocess.run(
        [sys.executable, "-m", "daemon", "sync", "--config", str(tmp_path / "b.toml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sync.returncode == 0, sync.stdout + sync.stderr


def test_a_prefix_outside_the_policy_is_refused_by_check(
    enforcing: Enforcing, tmp_path: Path
) -> None:
    """Control: the same daemon, aimed at a prefix the policy does not grant, is refused."""
    server, creds = enforcing.server, enforcing.shipped
    with MetadataEmulator() as md:
        cfg = config(tmp_path, "x", server, md, prefix="elsewhere")
        r = subprocess.run(
            [sys.executable, "-m", "daemon", "check", "--config", str(cfg)],
            env=daemon_env(creds),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL bucket"), r.stdout
    assert "elsewhere/iam-run/" in failed[0] and "access denied" in failed[0], failed[0]


def test_without_delete_retention_fails_with_a_warning_and_training_goes_on(
    enforcing: Enforcing, tmp_path: Path
) -> None:
    """A policy missing s3:DeleteObject: old checkpoints stay, nothing else stops."""
    run_id = "iam-no-delete"
    with MetadataEmulator() as md:
        cfg = config(tmp_path, "n", enforcing.server, md, run_id=run_id)
        sup = SupervisorProcess(cfg, daemon_env(enforcing.without_delete)).start()
        try:
            assert sup.wait_exit(90) == 0
        finally:
            stop(sup)
    failed = sup.find("retention_failed")
    assert failed and all(e["level"] == "warning" for e in failed)
    # The manifest goes first (the uncommit), and that is what is refused: nothing changed.
    assert failed[0]["error"].startswith(f"delete s3://{BUCKET}/{PREFIX}/{run_id}/checkpoints/")
    assert "/manifest.json: access denied" in failed[0]["error"], failed[0]
    assert sup.find("run_completed")[0]["step"] == 30
    assert not sup.find("checkpoint_deleted")
    # Every checkpoint committed stays: more than keep_remote = 2.
    committed = sup.find("checkpoint_committed")
    assert len({e["step"] for e in committed}) > 2
