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
        (GOOD + "\n[prometheus]\nx = 1\n", {}, "[prometheus]: unknown section"),
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


# --- every key: a wrong type and a wrong value, each named in the message ---------------

BASE = {
    "run": {"id": "r", "command": ["python"]},
    "checkpoints": {"local_dir": "/tmp/ckpt", "remote": "s3://b/p"},
}

# A value of the wrong type for each kind of key (the parser's first word in the message).
WRONG_TYPE: dict[str, tuple[object, str]] = {
    "run.id": (7, "expected a string"),
    "run.command": ("python train.py", "expected a non-empty list of strings"),
    "run.workdir": (["/a"], "expected a string"),
    "run.env": (["A=1"], "expected a table of string values"),
    "checkpoints.local_dir": (1, "expected a string"),
    "checkpoints.remote": (True, "expected a string"),
    "checkpoints.keep_remote": ("3", "expected an integer"),
    "s3.endpoint_url": (9000, "expected a string"),
    "s3.region": (1, "expected a string"),
    "s3.part_size_mb": (6.5, "expected an integer"),
    "s3.max_concurrency": ("8", "expected an integer"),
    "s3.checksum_algorithm": (32, "expected a string"),
    "imds.url": (None, "expected a string"),
    "imds.poll_interval": ("1s", "expected a number"),
    "imds.token_ttl": (1.5, "expected an integer"),
    "daemon.runtime_dir": (0, "expected a string"),
    "daemon.stop_budget": ("90", "expected a number"),
    "daemon.safety_margin": ([], "expected a number"),
    "daemon.rescan_interval": (True, "expected a number"),
    "daemon.max_restarts": (2.0, "expected an integer"),
    "daemon.restart_window": ("10m", "expected a number"),
    "daemon.progress_timeout": ("1h", "expected a number"),
    "metrics.textfile": (1, "expected a string"),
}

WRONG_VALUE: dict[str, tuple[object, str]] = {
    "run.id": ("has space", "must match"),
    "run.command": ([], "expected a non-empty list"),
    "run.workdir": ("relative/dir", "must be an absolute path"),
    "run.env": ({"A": 1}, "expected a table of string values"),
    "checkpoints.local_dir": ("ckpt", "must be an absolute path"),
    "checkpoints.remote": ("gs://bucket", "must look like s3://bucket"),
    "checkpoints.keep_remote": (0, "must be between 1 and 1000"),
    "s3.endpoint_url": ("ftp://x", "must be an http:// or https:// URL"),
    "s3.region": ("  ", "must not be empty"),
    "s3.part_size_mb": (1, "must be between 5 and 5120"),
    "s3.max_concurrency": (0, "must be between 1 and 64"),
    "s3.checksum_algorithm": ("MD5", "must be one of SHA256, CRC32, CRC32C, none"),
    "imds.url": ("169.254.169.254", "must be an http:// or https:// URL"),
    "imds.poll_interval": (0, "must be between"),
    "imds.token_ttl": (21601, "must be between 1 and 21600"),
    "daemon.runtime_dir": ("run", "must be an absolute path"),
    "daemon.stop_budget": (0, "must be between"),
    "daemon.safety_margin": (-1, "must be between"),
    "daemon.rescan_interval": (float("inf"), "must be between"),
    "daemon.max_restarts": (-1, "must be between 0 and 1000"),
    "daemon.restart_window": (0.5, "must be between"),
    "daemon.progress_timeout": (-1, "must be between"),
    "metrics.textfile": ("/var/lib/node_exporter/spot.txt", "must end in .prom"),
}


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, keys in config.SCHEMA.items() for k in keys]


def test_every_key_has_a_bad_type_and_a_bad_value_case() -> None:
    # A new key must come with its error cases.
    assert sorted(WRONG_TYPE) == sorted(all_keys())
    assert sorted(WRONG_VALUE) == sorted(all_keys())


def with_key(key: str, value: object) -> dict[str, dict[str, object]]:
    section, name = key.split(".")
    doc = {s: dict(t) for s, t in BASE.items()}
    doc.setdefault(section, {})[name] = value
    return doc


@pytest.mark.parametrize("key", sorted(WRONG_TYPE))
def test_wrong_type_is_named(key: str) -> None:
    value, words = WRONG_TYPE[key]
    with pytest.raises(ConfigError) as exc:
        config.build(with_key(key, value))
    assert str(exc.value).startswith(f"{key}: ") and words in str(exc.value)


@pytest.mark.parametrize("key", sorted(WRONG_VALUE))
def test_wrong_value_is_named(key: str) -> None:
    value, words = WRONG_VALUE[key]
    with pytest.raises(ConfigError) as exc:
        config.build(with_key(key, value))
    assert str(exc.value).startswith(f"{key}: ") and words in str(exc.value)


def test_paths_that_do_not_exist_or_cannot_be_directories(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (
            "run",
            "workdir",
            str(tmp_path / "missing"),
            f"run.workdir: {tmp_path / 'missing'} does not exist",
        ),
        ("run", "workdir", str(a_file), f"run.workdir: {a_file} is not a directory"),
        ("checkpoints", "local_dir", str(a_file / "ckpt"), f"{a_file} is a file"),
        ("daemon", "runtime_dir", str(a_file), "daemon.runtime_dir"),
    ]
    for section, key, value, words in cases:
        doc = {s: dict(t) for s, t in BASE.items()}
        doc.setdefault(section, {})[key] = value
        cfg = config.build(doc)  # the file is well-formed...
        with pytest.raises(ConfigError) as exc:
            config.check_paths(cfg)  # ...but this machine cannot run it
        assert words in str(exc.value)
    # Directories the daemon creates itself may be missing.
    config.check_paths(config.build({**BASE, "daemon": {"runtime_dir": str(tmp_path / "new")}}))


def test_cli_run_with_a_missing_workdir_exits_2(tmp_path: Path) -> None:
    text = GOOD.replace("[checkpoints]", f'workdir = "{tmp_path}/nope"\n\n[checkpoints]')
    r = run_cli("run", "--config", str(write(tmp_path, text)))
    assert r.returncode == 2
    assert f"run.workdir: {tmp_path}/nope does not exist" in r.stderr


@pytest.mark.parametrize("value", ["CRC32", "crc32", "SHA256", "none", "None"])
def test_checksum_algorithm_values(value: str) -> None:
    cfg = config.build(with_key("s3.checksum_algorithm", value))
    assert cfg.s3.checksum_algorithm == ("none" if value.lower() == "none" else value.upper())
    assert config.build(BASE).s3.checksum_algorithm == "CRC32"  # the default


def test_checksum_algorithm_crc32c_without_awscrt_names_the_key() -> None:
    from botocore.compat import HAS_CRT

    if HAS_CRT:
        assert config.build(with_key("s3.checksum_algorithm", "CRC32C")).s3.checksum_algorithm
        return
    with pytest.raises(ConfigError) as exc:
        config.build(with_key("s3.checksum_algorithm", "CRC32C"))
    assert str(exc.value).startswith("s3.checksum_algorithm: CRC32C needs awscrt")
