"""CI checks on systemd/spot-supervisor.service.

* ``systemd-analyze verify`` on an install into a staging root (install.sh --root), which
  must print nothing at all: systemd reports unknown or misplaced directives only as
  warnings, with exit status 0.
* ``systemd-analyze security --offline=yes`` at or below EXPOSURE_THRESHOLD.
* What the issue asks of the unit, directive by directive, and that it uses only
  directives of systemd 249 or older (Ubuntu 22.04 is the oldest supported base).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from systemd_sandbox import REPO, Staged, staged_install

from daemon import config

UNIT = "spot-supervisor.service"
UNIT_FILE = REPO / "systemd" / UNIT

# systemd-analyze's exposure scale is 0.0 (locked down) to 10.0 (exposed). The unit
# scores 3.5 on systemd 252. What keeps it from going lower is what training on a GPU
# needs: root (the trainer's files and devices), the GPU's device nodes (no
# PrivateDevices=/DeviceAllow=/ProtectClock=), network to S3 and the metadata service
# (no PrivateNetwork=/IPAddressDeny=), JIT code (no MemoryDenyWriteExecute=), and no
# PrivateUsers=. 4.0 leaves half a point for scoring differences between systemd
# versions and fails as soon as one real group of hardening is dropped (for instance
# RestrictAddressFamilies= alone is worth 0.6, the capability bounding set more than 1).
EXPOSURE_THRESHOLD = 4.0

# The systemd version that introduced each directive the unit may use. Anything newer
# than 249 would be ignored (with a warning) on Ubuntu 22.04's systemd.
MIN_SYSTEMD = 249
DIRECTIVE_SINCE = {
    "Description": 1, "Documentation": 1, "Wants": 1, "After": 1,
    "RequiresMountsFor": 1, "StartLimitIntervalSec": 230, "StartLimitBurst": 1,
    "Type": 1, "NotifyAccess": 1, "ExecStart": 1, "EnvironmentFile": 1, "Environment": 1,
    "TimeoutStartSec": 1, "TimeoutStopSec": 1, "WatchdogSec": 1, "KillMode": 1,
    "KillSignal": 1, "Restart": 1, "RestartSec": 1, "RestartPreventExitStatus": 189,
    "RuntimeDirectory": 211, "StateDirectory": 235, "UMask": 1,
    "ProtectSystem": 214, "ReadWritePaths": 231, "PrivateTmp": 1, "ProtectHome": 214,
    "NoNewPrivileges": 187, "ProtectKernelTunables": 232, "ProtectKernelModules": 232,
    "ProtectKernelLogs": 244, "ProtectControlGroups": 232, "ProtectHostname": 242,
    "RestrictSUIDSGID": 242, "RestrictRealtime": 231, "RestrictNamespaces": 233,
    "LockPersonality": 235, "SystemCallArchitectures": 209, "SystemCallFilter": 187,
    "RestrictAddressFamilies": 211, "CapabilityBoundingSet": 1, "WantedBy": 1,
}  # fmt: skip
# Each of these would cut the training command off from the GPU or break CUDA.
FORBIDDEN = (
    "PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "PrivateUsers",
    "MemoryDenyWriteExecute", "DynamicUser", "ProcSubset",
)  # fmt: skip


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every directive, in order."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def one(key: str) -> str:
    values = [v for _s, k, v in directives(UNIT_FILE.read_text()) if k == key]
    assert len(values) == 1, f"{key}= appears {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*(min|s|h|)", value):
        total += int(number) * units[unit]
    return total


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (systemd)")
    return tool


@pytest.fixture(scope="module")
def staged() -> Staged:
    _analyze()
    return staged_install()


def test_systemd_analyze_verify_is_silent_on_a_staged_install(staged: Staged) -> None:
    r = subprocess.run(
        [_analyze(), "verify", f"--root={staged.root}", f"/etc/systemd/system/{UNIT}"],
        capture_output=True,
        text=True,
    )
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_systemd_analyze_verify_catches_a_bad_directive(staged: Staged, tmp_path: Path) -> None:
    # The check above would pass vacuously if verify never looked at our file.
    root = tmp_path / "root"
    shutil.copytree(staged.root / "usr", root / "usr", symlinks=True)
    shutil.copytree(staged.root / "etc", root / "etc", symlinks=True)
    (root / "opt/spot-supervisor/venv/bin").mkdir(parents=True)
    exe = root / "opt/spot-supervisor/venv/bin/spot-supervisor"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = root / "etc/systemd/system" / UNIT
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixed\nKillMod=oops"))
    r = subprocess.run(
        [_analyze(), "verify", f"--root={root}", f"/etc/systemd/system/{UNIT}"],
        capture_output=True,
        text=True,
    )
    assert "KillMod" in r.stdout + r.stderr


def test_security_exposure_is_at_most_the_threshold(staged: Staged) -> None:
    tool = _analyze()
    help_text = subprocess.run([tool, "--help"], capture_output=True, text=True).stdout
    if "--offline" not in help_text or "--threshold" not in help_text:
        pytest.skip("systemd-analyze is older than 250 (no --offline/--threshold)")
    threshold = f"--threshold={int(EXPOSURE_THRESHOLD * 10)}"  # its scale is 0..100
    r = subprocess.run(
        [tool, "security", "--offline=yes", f"--root={staged.root}", threshold, UNIT],
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    exposure = float(m[1])
    assert exposure <= EXPOSURE_THRESHOLD, r.stdout
    assert r.returncode == 0, r.stdout + r.stderr


def test_unit_uses_only_directives_of_systemd_249() -> None:
    used = {k for _s, k, _v in directives(UNIT_FILE.read_text())}
    unknown = used - DIRECTIVE_SINCE.keys()
    assert not unknown, f"add {unknown} to DIRECTIVE_SINCE with the version that added it"
    assert all(DIRECTIVE_SINCE[k] <= MIN_SYSTEMD for k in used)
    assert not used & set(FORBIDDEN)


def test_unit_has_what_the_issue_asks() -> None:
    text = UNIT_FILE.read_text()
    assert one("Wants") == one("After") == "network-online.target"
    assert one("Type") == "notify"
    assert one("KillMode") == "mixed"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "2"
    assert one("NoNewPrivileges") == one("PrivateTmp") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("RuntimeDirectory") == one("StateDirectory") == "spot-supervisor"
    assert one("EnvironmentFile").startswith("-")  # optional
    assert seconds(one("WatchdogSec")) > 0
    assert seconds(one("TimeoutStartSec")) >= 60
    # The daemon's own stop budget, plus room for the final commit, fits in TimeoutStopSec.
    assert seconds(one("TimeoutStopSec")) >= config.DaemonConfig().stop_budget + 30
    assert "--config /etc/spot-supervisor/config.toml" in one("ExecStart")
    assert "SPOT_SUPERVISOR_DAEMON_RUNTIME_DIR=/run/spot-supervisor" in text


def test_shipped_config_is_valid_and_its_checkpoint_dir_is_writable_in_the_unit() -> None:
    cfg = config.build(config.read_toml(REPO / "systemd/config.toml"), environ={})
    local = cfg.checkpoints.local_dir
    for key in ("RequiresMountsFor", "ReadWritePaths"):
        path = Path(one(key).lstrip("-"))
        assert local == path or path in local.parents, f"{key}={path} does not cover {local}"


def test_cloud_init_example_writes_a_valid_config() -> None:
    import yaml  # moto's dependency; the example must parse as cloud-config

    doc = yaml.safe_load((REPO / "systemd/cloud-init/user-data.yaml").read_text())
    files = {f["path"]: f["content"] for f in doc["write_files"]}
    cfg = config.build(config.tomllib.loads(files["/etc/spot-supervisor/config.toml"]), environ={})
    assert str(cfg.checkpoints.local_dir).startswith("/opt/dlami/nvme/")
    starts = [c for c in doc["runcmd"] if "start" in c]
    assert starts == [["systemctl", "start", "--no-block", UNIT]]


def test_iam_policy_is_limited_to_the_prefix() -> None:
    import json

    policy = json.loads((REPO / "systemd/iam-policy.json").read_text())
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    listing = by_sid["ListTheRunsPrefixOnly"]
    assert listing["Action"] == "s3:ListBucket"
    assert listing["Condition"]["StringLike"]["s3:prefix"] == ["PREFIX/*", "PREFIX/"]
    objects = by_sid["ReadWriteCheckpointsUnderThePrefix"]
    assert objects["Resource"] == "arn:aws:s3:::BUCKET/PREFIX/*"
    assert all(s["Effect"] == "Allow" and "*" not in str(s["Action"]) for s in by_sid.values())
