"""Config: layers, precedence, and errors that name the key (exit 2 through the CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon import config
from daemon.config import ConfigError

GOOD = """
[run]
id = "llama-ft-001"
command = ["python", "train.py", "--epochs", "3"]

[checkpoints]
local_dir = "/opt/dlami/nvme/checkpoints"
remote = "s3://my-bucket/spot-runs"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = config.load(str(write(tmp_path, GOOD)), environ={})
    assert cfg.run.id == "llama-ft-001"
    assert cfg.run.command == ("python", "train.py", "--epochs", "3")
    assert cfg.checkpoints.local_dir == Path("/opt/dlami/nvme/checkpoints")
    assert cfg.imds.url == "http://169.254.169.254"
    assert cfg.imds.poll_interval == 1.0
    assert cfg.daemon.stop_budget == 90.0
    assert cfg.notice_file == Path("/run/spot-supervisor/notice.json")


def test_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "systemd" / "config.toml"
    cfg = config.load(str(example), environ={})
    assert cfg.checkpoints.remote == "s3://my-bucket/spot-runs"


def test_environment_beats_file_and_flags_beat_environment(tmp_path: Path) -> None:
    env = {
        "SPOT_SUPERVISOR_IMDS_POLL_INTERVAL": "0.5",
        "SPOT_SUPERVISOR_RUN_ID": "from-env",
        "SPOT_SUPERVISOR_RUN_COMMAND": '["bash", "-c", "true"]',
        "SPOT_SUPERVISOR_CHECKPOINTS_LOCAL_DIR": "/data/ckpt",
    }
    cfg = config.load(str(write(tmp_path, GOOD)), environ=env, overrides={"run": {"id": "flag"}})
    assert cfg.imds.poll_interval == 0.5
    assert cfg.run.id == "flag"
    assert cfg.run.command == ("bash", "-c", "true")
    assert cfg.checkpoints.local_dir == Path("/data/ckpt")


def test_config_path_from_environment(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD)
    cfg = config.load(None, environ={"SPOT_SUPERVISOR_CONFIG": str(p)})
    assert cfg.source == str(p)


@pytest.mark.parametrize(
    ("text", "env", "names"),
    [
        (GOOD + "\n[imds]\npoll_intervall = 2\n", {}, "imds.poll_intervall: unknown key"),
        (GOOD + "\n[metrics]\nx = 1\n", {}, "[metrics]: unknown section"),
        (GOOD + '\n[imds]\npoll_interval = "fast"\n', {}, "imds.poll_interval: expected a number"),
        (GOOD + "\n[daemon]\nstop_budget = -1\n", {}, "daemon.stop_budget"),
        (GOOD.replace('id = "llama-ft-001"', 'id = "bad id!"'), {}, "run.id"),
        (GOOD.replace('id = "llama-ft-001"\n', ""), {}, "run.id: required key is missing"),
        (
            GOOD.replace('command = ["python", "train.py", "--epochs", "3"]', 'command = "python"'),
            {},
            "run.command: expected a non-empty list",
        ),
        (GOOD.replace("s3://my-bucket/spot-runs", "my-bucket"), {}, "checkpoints.remote"),
        (
            GOOD.replace("/opt/dlami/nvme/checkpoints", "relative/dir"),
            {},
            "checkpoints.local_dir: 'relative/dir' must be an absolute path",
        ),
        (GOOD + "\n[s3]\nendpoint_url = 9000\n", {}, "s3.endpoint_url: expected a string"),
        (GOOD, {"SPOT_SUPERVISOR_IMDS_POLL_INTERVALL": "1"}, "SPOT_SUPERVISOR_IMDS_POLL_INTERVALL"),
        (GOOD, {"SPOT_SUPERVISOR_DAEMON_MAX_RESTARTS": "many"}, "daemon.max_restarts"),
        ("[run\nid=", {}, "is not valid TOML"),
    ],
)
def test_errors_name_what_is_wrong(
    tmp_path: Path, text: str, env: dict[str, str], names: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(str(write(tmp_path, text)), environ=env)
    assert names in str(exc.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_missing_file_exits_2_and_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    r = run_cli("run", "--config", str(missing))
    assert r.returncode == 2
    assert f"config file {missing} does not exist" in r.stderr


def test_cli_unknown_key_exits_2_and_names_the_key(tmp_path: Path) -> None:
    r = run_cli("run", "--config", str(write(tmp_path, GOOD + "\n[run]\n")))
    assert r.returncode == 2  # duplicate [run] table is invalid TOML
    r = run_cli("check", "--config", str(write(tmp_path, GOOD + "\n[daemon]\nbudget = 3\n")))
    assert r.returncode == 2
    assert "daemon.budget: unknown key" in r.stdout


def test_cli_bad_type_exits_2_and_names_the_key(tmp_path: Path) -> None:
    r = run_cli("run", "--config", str(write(tmp_path, GOOD + "\n[imds]\npoll_interval = [1]\n")))
    assert r.returncode == 2
    assert "imds.poll_interval: expected a number" in r.stderr


def test_cli_usage_error_exits_2() -> None:
    r = run_cli("frobnicate")
    assert r.returncode == 2
    assert "invalid choice" in r.stderr


def test_cli_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("spot-supervisor ")
