"""Configuration: TOML file, then ``SPOT_SUPERVISOR_<SECTION>_<KEY>`` environment, then flags.

Precedence (CONTRACT §2): flags over the environment, the environment over the file,
the file over the defaults. Unknown keys, wrong types and missing required keys raise
:class:`ConfigError`, whose message names the key; the CLI turns it into exit 2.

This module is the configuration's public face: the dataclasses the daemon reads
(:class:`Config` and its sections), the loading (:func:`load`, :func:`build`), the rules
between keys, and the checks only the running machine can make (:func:`check_paths`).
What each key accepts is :mod:`daemon.config_values`; the table of keys, parsers and
defaults is :mod:`daemon.config_schema`. Every name of those two that callers use is
importable from here as before.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config_schema import REQUIRED, SCHEMA, STRING_PARSERS
from daemon.config_values import (
    CHECKSUM_ALGORITHMS,
    PROVIDERS,
    REMOTE_SCHEMES,
    RUN_ID_RE,
    ConfigError,
    Parser,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/spot-supervisor/config.toml")
CONFIG_ENV = "SPOT_SUPERVISOR_CONFIG"
ENV_PREFIX = "SPOT_SUPERVISOR_"


@dataclass(frozen=True)
class RunConfig:
    id: str
    command: tuple[str, ...]
    workdir: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    # The training command runs as this user (and group), the supervisor stays root.
    user: str | None = None
    group: str | None = None
    # Instances that train the run together (CONTRACT §7), and this one's name in
    # storage (None: the instance id from the metadata service, else the hostname).
    nodes: int = 1
    node_id: str | None = None


@dataclass(frozen=True)
class CheckpointsConfig:
    local_dir: Path
    remote: str
    keep_remote: int = 3


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str | None = None
    region: str | None = None
    # Tuned for S3 as AWS serves it (about 90 MB/s and ~30 ms to first byte per
    # connection; see daemon.storage.s3client): 16 MiB parts keep a connection busy
    # ~86% of the time, and 32 of them carry ~2.5 GB/s, a 7B model's 112 GB in ~45 s.
    part_size_mb: int = 16  # multipart part size (S3: at least 5 MiB)
    max_concurrency: int = 32  # parallel requests of one transfer (and connections)
    # The additional checksum S3 verifies on every upload: SHA256, CRC32, CRC32C or none.
    checksum_algorithm: str = "CRC32"


# Where each cloud's metadata service answers: link-local on AWS and Azure, the name
# every GCE instance resolves on GCP.
DEFAULT_METADATA_URLS = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}


@dataclass(frozen=True)
class ImdsConfig:
    # Given, or the provider's default (DEFAULT_METADATA_URLS): resolved at load.
    url: str = "http://169.254.169.254"
    poll_interval: float = 1.0
    token_ttl: int = 21600
    # Whose metadata service and notices: "aws", "gcp" or "azure" (CONTRACT §8).
    provider: str = "aws"


@dataclass(frozen=True)
class AzureConfig:
    # Approve (StartRequests) this VM's Preempt/Terminate event once the emergency
    # checkpoint is committed, so the eviction does not wait out NotBefore; never before.
    approve_after_commit: bool = True
    # The storage account of az:// remotes when AZURE_STORAGE_CONNECTION_STRING is not
    # set (DefaultAzureCredential): https://<account>.blob.core.windows.net
    account_url: str | None = None


@dataclass(frozen=True)
class DaemonConfig:
    runtime_dir: Path = Path("/run/spot-supervisor")
    stop_budget: float = 90.0
    safety_margin: float = 5.0
    rescan_interval: float = 30.0
    max_restarts: int = 5
    restart_window: float = 600.0
    progress_timeout: float = 0.0
    # Seconds a slot's lease may go unrenewed before a standby takes it over.
    lease_ttl: float = 30.0
    # What ``run`` exits with after an orderly drain on a cloud notice (not after our own
    # SIGTERM): an orchestrator that recovers only on chosen codes (SkyPilot's
    # ``recover_on_exit_codes``) must not read the drain as success. 0 for systemd.
    exit_code_after_notice: int = 0


@dataclass(frozen=True)
class MetricsConfig:
    textfile: Path | None = None


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    run: RunConfig
    checkpoints: CheckpointsConfig
    s3: S3Config
    imds: ImdsConfig
    daemon: DaemonConfig
    metrics: MetricsConfig = MetricsConfig()
    azure: AzureConfig = AzureConfig()
    source: str = "<defaults>"

    @property
    def notice_file(self) -> Path:
        """Where the supervisor writes the notice before it sends SIGTERM (CONTRACT §3)."""
        return self.daemon.runtime_dir / "notice.json"

    @property
    def state_file(self) -> Path:
        """The state file that ``status`` reads (CONTRACT §5a)."""
        return self.daemon.runtime_dir / "state.json"


def _env_value(raw: str, parse: Parser) -> Any:
    """A value from the environment, for a key parsed by ``parse``.

    Other keys take TOML (``90``, ``["a"]``, ``{A = "1"}``), and a string when it is not
    TOML at all. A string key takes the text as it is, except a TOML string literal
    (``"abc"``), which is unquoted as before.
    """
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    if parse in STRING_PARSERS and not isinstance(value, str):
        return raw
    return value


def _from_environment(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for section, keys in SCHEMA.items():
            key = rest[len(section) + 1 :]
            if rest.startswith(section + "_") and key in keys:
                layer.setdefault(section, {})[key] = _env_value(raw, keys[key][0])
                break
        else:
            raise ConfigError(f"environment variable {name}: no such config key")
    return layer


def resolve_path(flag: str | None, environ: Mapping[str, str]) -> Path:
    """``--config``, else ``$SPOT_SUPERVISOR_CONFIG``, else the default path."""
    if flag:
        return Path(flag)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def read_toml(path: Path) -> dict[str, Any]:
    """Parse the config file; a missing, unreadable or invalid file is a ConfigError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def build(
    file_doc: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    source: str = "<memory>",
) -> Config:
    """Merge the layers and validate every key; raise ConfigError naming the first bad one."""
    merged: dict[str, dict[str, Any]] = {}
    for section, table in file_doc.items():
        if section not in SCHEMA:
            raise ConfigError(f"[{section}]: unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}]: expected a table")
        for key in table:
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"{section}.{key}: unknown key (known in [{section}]: "
                    f"{', '.join(SCHEMA[section])})"
                )
        merged[section] = dict(table)
    for layer in (_from_environment(environ or {}), overrides or {}):
        for section, table in layer.items():
            merged.setdefault(section, {}).update(table)

    values: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given = merged.get(section, {})
        values[section] = {}
        for key, (parse, default) in keys.items():
            name = f"{section}.{key}"
            if key in given:
                values[section][key] = parse(name, given[key])
            elif default is REQUIRED:
                raise ConfigError(f"{name}: required key is missing")
            else:
                values[section][key] = default
    if values["run"]["group"] is not None and values["run"]["user"] is None:
        raise ConfigError("run.group: needs run.user (the group is the one the trainer runs as)")
    if values["imds"]["url"] is None:
        values["imds"]["url"] = DEFAULT_METADATA_URLS[values["imds"]["provider"]]
    return Config(
        run=RunConfig(**values["run"]),
        checkpoints=CheckpointsConfig(**values["checkpoints"]),
        s3=S3Config(**values["s3"]),
        imds=ImdsConfig(**values["imds"]),
        daemon=DaemonConfig(**values["daemon"]),
        metrics=MetricsConfig(**values["metrics"]),
        azure=AzureConfig(**values["azure"]),
        source=source,
    )


def load(
    flag: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Load the configuration the way every subcommand does."""
    env = os.environ if environ is None else environ
    path = resolve_path(flag, env)
    return build(read_toml(path), env, overrides, source=str(path))


def check_paths(cfg: Config) -> None:
    """What only the running machine can tell: the paths the daemon needs are usable.

    ``run`` and ``check`` call this (``status`` does not: it must work anywhere the
    config can be read). Directories the daemon creates itself may be missing, but not
    be files, nor sit under a file.
    """
    _check_run_user(cfg)
    workdir = cfg.run.workdir
    if workdir is not None and not workdir.is_dir():
        what = "is not a directory" if workdir.exists() else "does not exist"
        raise ConfigError(f"run.workdir: {workdir} {what}")
    for key, path in (
        ("checkpoints.local_dir", cfg.checkpoints.local_dir),
        ("daemon.runtime_dir", cfg.daemon.runtime_dir),
    ):
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(f"{key}: {path} cannot be a directory: {probe} is a file")


def _check_run_user(cfg: Config) -> None:
    """``run.user`` and ``run.group`` exist here, and this process may switch to them.

    Here and not at load time: ``status`` and ``user-data`` read the config on machines
    (an operator's laptop) that need not have the trainer's user.
    """
    if cfg.run.user is None:
        return
    from daemon import runas

    try:
        runas.resolve(cfg.run.user, cfg.run.group)
    except runas.IdentityError as exc:
        raise ConfigError(f"{exc.key}: {exc}") from None
    if not runas.can_switch():
        raise ConfigError(
            f"run.user: running the training command as {cfg.run.user!r} needs root with"
            " CAP_SETUID and CAP_SETGID (see the unit's CapabilityBoundingSet=)"
        )


__all__ = [
    "CHECKSUM_ALGORITHMS",
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_METADATA_URLS",
    "ENV_PREFIX",
    "PROVIDERS",
    "REMOTE_SCHEMES",
    "RUN_ID_RE",
    "SCHEMA",
    "AzureConfig",
    "CheckpointsConfig",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "ImdsConfig",
    "MetricsConfig",
    "RunConfig",
    "S3Config",
    "build",
    "check_paths",
    "load",
    "read_toml",
    "resolve_path",
]
