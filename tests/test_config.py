"""Config: layers, precedence, and errors that name the key (exit 2 through the CLI).

What each key's value may be is tests/test_config_values.py."""

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


# --- one key set in a minimal document (test_config_values.py uses these too) ----------

BASE = {
    "run": {"id": "r", "command": ["python"]},
    "checkpoints": {"local_dir": "/tmp/ckpt", "remote": "s3://bkt/p"},
}


def with_key(key: str, value: object) -> dict[str, dict[str, object]]:
    section, name = key.split(".")
    doc = {s: dict(t) for s, t in BASE.items()}
    doc.setdefault(section, {})[name] = value
    return doc


def refusal(key: str, value: object) -> str | None:
    """The ConfigError's message for ``key = value``, or None when the config accepts it."""
    try:
        config.build(with_key(key, value))
    except ConfigError as exc:
        return str(exc)
    return None


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


@pytest.mark.parametrize(
    ("provider", "url"),
    [
        ("aws", "http://169.254.169.254"),
        ("gcp", "http://metadata.google.internal"),
        ("azure", "http://169.254.169.254"),
    ],
)
def test_imds_url_defaults_per_provider(provider: str, url: str) -> None:
    cfg = config.build({**BASE, "imds": {"provider": provider}})
    assert cfg.imds.provider == provider and cfg.imds.url == url
    # A given url keeps its meaning whatever the provider.
    given = config.build({**BASE, "imds": {"provider": provider, "url": "http://127.0.0.1:8"}})
    assert given.imds.url == "http://127.0.0.1:8"


def test_provider_and_azure_keys_from_the_environment() -> None:
    env = {
        "SPOT_SUPERVISOR_IMDS_PROVIDER": "gcp",
        "SPOT_SUPERVISOR_AZURE_APPROVE_AFTER_COMMIT": "false",
    }
    cfg = config.build(BASE, env)
    assert cfg.imds.provider == "gcp" and cfg.imds.url == "http://metadata.google.internal"
    assert cfg.azure.approve_after_commit is False
    assert config.build(BASE).azure.approve_after_commit is True  # the default


@pytest.mark.parametrize(
    ("name", "raw", "attr"),
    [
        ("SPOT_SUPERVISOR_RUN_ID", "12345", ("run", "id")),
        ("SPOT_SUPERVISOR_RUN_ID", "2024-01-01", ("run", "id")),
        ("SPOT_SUPERVISOR_RUN_ID", "1e3", ("run", "id")),
        ("SPOT_SUPERVISOR_RUN_ID", "true", ("run", "id")),
        ("SPOT_SUPERVISOR_S3_REGION", "inf", ("s3", "region")),
        ("SPOT_SUPERVISOR_RUN_USER", "1000", ("run", "user")),
        ("SPOT_SUPERVISOR_S3_CHECKSUM_ALGORITHM", "nan", None),  # refused by value, not type
    ],
)
def test_string_keys_from_the_environment_are_taken_as_strings(
    name: str, raw: str, attr: tuple[str, str] | None
) -> None:
    if attr is None:
        message = refusal_from_env(name, raw)
        assert message is not None and "must be one of" in message
        return
    cfg = config.build(BASE, environ={name: raw})
    assert getattr(getattr(cfg, attr[0]), attr[1]) == raw


def refusal_from_env(name: str, raw: str) -> str | None:
    try:
        config.build(BASE, environ={name: raw})
    except ConfigError as exc:
        return str(exc)
    return None


def test_string_keys_from_the_environment_may_still_be_toml_quoted() -> None:
    # The old form: a TOML string literal. Keep it working.
    cfg = config.build(BASE, environ={"SPOT_SUPERVISOR_RUN_ID": '"quoted-id"'})
    assert cfg.run.id == "quoted-id"
    # Non-string keys still take TOML values.
    env = {"SPOT_SUPERVISOR_DAEMON_MAX_RESTARTS": "7", "SPOT_SUPERVISOR_RUN_COMMAND": '["a", "b"]'}
    cfg = config.build(BASE, environ=env)
    assert cfg.daemon.max_restarts == 7 and cfg.run.command == ("a", "b")


def test_run_group_needs_run_user() -> None:
    message = refusal("run.group", "video")
    assert message is not None and message.startswith("run.group: ") and "run.user" in message


def test_unknown_run_user_is_refused_by_the_machine_checks_not_at_load() -> None:
    # Load time cannot know the machine's users (status, user-data run elsewhere);
    # run and check call check_paths, which exits 2 naming the key.
    cfg = config.build(with_key("run.user", "no-such-user-7f3a"))
    assert cfg.run.user == "no-such-user-7f3a"
    with pytest.raises(ConfigError) as exc:
        config.check_paths(cfg)
    assert str(exc.value).startswith("run.user: ") and "no-such-user-7f3a" in str(exc.value)


def test_unknown_run_group_is_refused_by_the_machine_checks() -> None:
    doc = with_key("run.user", "nobody")
    doc["run"]["group"] = "no-such-group-7f3a"
    with pytest.raises(ConfigError) as exc:
        config.check_paths(config.build(doc))
    assert str(exc.value).startswith("run.group: ") and "no-such-group-7f3a" in str(exc.value)


def test_exit_code_after_notice_defaults_to_0_and_refuses_2() -> None:
    assert config.build(BASE).daemon.exit_code_after_notice == 0  # systemd: a drain is success
    doc = with_key("daemon.exit_code_after_notice", 75)
    assert config.build(doc).daemon.exit_code_after_notice == 75
    # From the environment it is an integer too (SkyPilot recipes set it there).
    env = {"SPOT_SUPERVISOR_DAEMON_EXIT_CODE_AFTER_NOTICE": "75"}
    assert config.build(BASE, env).daemon.exit_code_after_notice == 75
    # 2 is "bad configuration": the unit never restarts it, an orchestrator gives up on it.
    with pytest.raises(ConfigError) as exc:
        config.build(with_key("daemon.exit_code_after_notice", 2))
    assert str(exc.value).startswith("daemon.exit_code_after_notice: 2 is reserved")
    for bad, words in ((-1, "between 0 and 255"), (True, "expected an integer"), (7.5, "integer")):
        with pytest.raises(ConfigError, match=words):
            config.build(with_key("daemon.exit_code_after_notice", bad))
