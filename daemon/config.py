"""Configuration: TOML file, then ``SPOT_SUPERVISOR_<SECTION>_<KEY>`` environment, then flags.

Precedence (CONTRACT §2): flags over the environment, the environment over the file,
the file over the defaults. Unknown keys, wrong types and missing required keys raise
:class:`ConfigError`, whose message names the key; the CLI turns it into exit 2.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/spot-supervisor/config.toml")
CONFIG_ENV = "SPOT_SUPERVISOR_CONFIG"
ENV_PREFIX = "SPOT_SUPERVISOR_"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key (or file) and why."""


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


PROVIDERS = ("aws", "gcp", "azure")
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


# --- the schema: section -> key -> (parser, default or REQUIRED) ----------------------

_REQUIRED = object()
Parser = Callable[[str, Any], Any]


def _string(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string, got {type(v).__name__} {v!r}")
    if "\0" in v:
        # Paths, argv and names go to the OS, which ends a C string there (Python raises).
        raise ConfigError(f"{key}: {v!r} must not contain a NUL character")
    return v


def _nonempty_string(key: str, v: Any) -> str:
    s = _string(key, v)
    if not s.strip():
        raise ConfigError(f"{key}: must not be empty")
    return s


def _run_id(key: str, v: Any) -> str:
    s = _string(key, v)
    if not RUN_ID_RE.match(s):
        raise ConfigError(f"{key}: {s!r} must match [A-Za-z0-9._-]{{1,128}}")
    return s


def _argv(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v):
        raise ConfigError(f"{key}: expected a non-empty list of strings (argv), got {v!r}")
    if not v[0]:
        raise ConfigError(f"{key}: the program (first element) must not be empty")
    for i, arg in enumerate(v):
        if "\0" in arg:  # Popen would raise ValueError
            raise ConfigError(f"{key}: argument {i} {arg!r} must not contain a NUL character")
    return tuple(v)


def _path(key: str, v: Any) -> Path:
    s = _nonempty_string(key, v)
    p = Path(s)
    if not p.is_absolute():
        raise ConfigError(f"{key}: {s!r} must be an absolute path")
    return p


def _prom_path(key: str, v: Any) -> Path:
    p = _path(key, v)
    if p.suffix != ".prom":
        raise ConfigError(f"{key}: {p} must end in .prom (node_exporter reads only those)")
    return p


CHECKSUM_ALGORITHMS = ("SHA256", "CRC32", "CRC32C", "none")


def _checksum_algorithm(key: str, v: Any) -> str:
    s = _string(key, v)
    name = "none" if s.lower() == "none" else s.upper()
    if name not in CHECKSUM_ALGORITHMS:
        raise ConfigError(f"{key}: {s!r} must be one of {', '.join(CHECKSUM_ALGORITHMS)}")
    if name == "CRC32C":
        from botocore.compat import HAS_CRT  # only here: config loads without boto

        if not HAS_CRT:
            raise ConfigError(
                f"{key}: CRC32C needs awscrt (pip install 'botocore[crt]'), which is not"
                " installed; use CRC32 or SHA256"
            )
    return name


# The same rules as daemon.storage.s3client.parse_remote (s3://) and
# daemon.storage.backend.parse_blob_remote (gs://, az://), which cannot be imported here
# (boto3, the cloud SDKs); tests/test_config.py checks that they agree on every case it lists.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,254}$")
# GCS: 3-63 characters (222 with dots) of a-z 0-9 - _ ., starting and ending alphanumeric.
_GCS_BUCKET_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{1,220})[a-z0-9]$")
# Azure: 3-63 of a-z 0-9 -, starting with a letter or digit, no "--", not ending in "-".
_AZURE_CONTAINER_RE = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
REMOTE_SCHEMES = ("s3", "gs", "az")


def _remote(key: str, v: Any) -> str:
    s = _nonempty_string(key, v)
    m = re.match(r"^(s3|gs|az)://([^/]*)(?:/(.*))?$", s, re.DOTALL)
    if not m or not m[2]:
        raise ConfigError(
            f"{key}: {s!r} must look like s3://bucket[/prefix], gs://bucket[/prefix] or"
            " az://container[/prefix]"
        )
    scheme, bucket, prefix = m[1], m[2], m[3] or ""
    if scheme == "s3" and not _BUCKET_RE.match(bucket):
        raise ConfigError(
            f"{key}: {bucket!r} is not a valid bucket name (3 to 255 of A-Z a-z 0-9 . _ -,"
            " starting with a letter or digit)"
        )
    if scheme == "gs" and (
        not _GCS_BUCKET_RE.match(bucket)
        or (len(bucket) > 63 and "." not in bucket)
        or any(len(part) > 63 for part in bucket.split("."))
    ):
        raise ConfigError(
            f"{key}: {bucket!r} is not a valid GCS bucket name (3 to 63 of a-z 0-9 - _ .,"
            " up to 222 with dots, starting and ending with a letter or digit)"
        )
    if scheme == "az" and not _AZURE_CONTAINER_RE.match(bucket):
        raise ConfigError(
            f"{key}: {bucket!r} is not a valid Azure container name (3 to 63 of a-z 0-9 -,"
            " starting and ending with a letter or digit, no '--')"
        )
    if any(c in s for c in "?#") or any(c.isspace() for c in s):
        raise ConfigError(f"{key}: {s!r}: no '?', '#' or whitespace in a key prefix")
    if "//" in prefix.strip("/"):
        raise ConfigError(f"{key}: {s!r} has an empty path segment ('//') in its prefix")
    return s


def _http_url(key: str, s: str) -> str:
    if not re.match(r"^https?://[^/\s]+", s):
        raise ConfigError(f"{key}: {s!r} must be an http:// or https:// URL")
    return s.rstrip("/")


def _endpoint_url(key: str, v: Any) -> str:
    s = _http_url(key, _nonempty_string(key, v))
    # botocore's own test when it builds the client (no "_" in a host name, for one);
    # imported only here: the config loads without boto.
    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    if not (is_valid_endpoint_url(s) or is_valid_ipv6_endpoint_url(s)):
        raise ConfigError(f"{key}: {s!r} is not a URL botocore accepts (is the host name valid?)")
    return s


def _region(key: str, v: Any) -> str:
    s = _nonempty_string(key, v)
    from botocore.exceptions import InvalidRegionError
    from botocore.utils import validate_region_name

    try:
        validate_region_name(s)
    except InvalidRegionError:
        raise ConfigError(f"{key}: {s!r} is not a region name (like us-east-1)") from None
    return s


def _metadata_url(key: str, v: Any) -> str:
    from daemon.notices.imds import parse_base_url  # the client's own rule: config agrees with it

    s = _nonempty_string(key, v)
    try:
        parse_base_url(s)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return s.rstrip("/")


def _provider(key: str, v: Any) -> str:
    s = _string(key, v)
    if s not in PROVIDERS:
        raise ConfigError(f"{key}: {s!r} must be one of {', '.join(PROVIDERS)}")
    return s


def _boolean(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(
            f"{key}: expected a boolean (true or false), got {type(v).__name__} {v!r}"
        )
    return v


def _account_url(key: str, v: Any) -> str:
    s = _http_url(key, _nonempty_string(key, v))
    local = re.match(r"^http://(127\.|localhost([:/]|$)|\[::1\])", s)
    if not s.startswith("https://") and not local:
        # The account key or token would cross the network in the clear.
        raise ConfigError(f"{key}: {s!r} must be https:// (plain http only to localhost)")
    return s


def _env_map(key: str, v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    ):
        raise ConfigError(f"{key}: expected a table of string values, got {v!r}")
    for name, value in v.items():
        # What Popen refuses with ValueError, plus the empty name nobody means.
        if not name or "=" in name or "\0" in name:
            raise ConfigError(f"{key}: {name!r} is not an environment variable name")
        if "\0" in value:
            raise ConfigError(f"{key}: {name}={value!r} must not contain a NUL character")
    return dict(v)


# Login names (and group names) as the passwd and group databases hold them; ":" and
# whitespace would break those files, a leading "-" would read as an option.
_ACCOUNT_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,255}\$?$")


def _node_id(key: str, v: Any) -> str:
    # A key segment in storage, like the run id.
    return _run_id(key, v)


def _account(key: str, v: Any) -> str:
    s = _nonempty_string(key, v)
    if not _ACCOUNT_RE.match(s):
        raise ConfigError(f"{key}: {s!r} is not a user or group name")
    return s


def _number(lo: float, hi: float) -> Parser:
    def parse(key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(v).__name__} {v!r}")
        f = float(v)
        if not (math.isfinite(f) and lo <= f <= hi):
            raise ConfigError(f"{key}: {v!r} must be between {lo:g} and {hi:g}")
        return f

    return parse


def _integer(lo: int, hi: int) -> Parser:
    def parse(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}: expected an integer, got {type(v).__name__} {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(f"{key}: {v!r} must be between {lo} and {hi}")
        return v

    return parse


# 2 means "bad configuration" (CONTRACT §1): the unit's RestartPreventExitStatus=2 never
# restarts it, and an orchestrator must not mistake a drain for a config error either.
_RESERVED_EXIT_CODES = {2: "2 is reserved for configuration errors"}


def _exit_code(key: str, v: Any) -> int:
    code: int = _integer(0, 255)(key, v)
    if code in _RESERVED_EXIT_CODES:
        raise ConfigError(f"{key}: {_RESERVED_EXIT_CODES[code]}; pick another (e.g. 75)")
    return code


SCHEMA: dict[str, dict[str, tuple[Parser, Any]]] = {
    "run": {
        "id": (_run_id, _REQUIRED),
        "command": (_argv, _REQUIRED),
        "workdir": (_path, None),
        "env": (_env_map, {}),
        "user": (_account, None),
        "group": (_account, None),
        "nodes": (_integer(1, 1024), 1),
        "node_id": (_node_id, None),
    },
    "checkpoints": {
        "local_dir": (_path, _REQUIRED),
        "remote": (_remote, _REQUIRED),
        "keep_remote": (_integer(1, 1000), 3),
    },
    "s3": {
        "endpoint_url": (_endpoint_url, None),
        "region": (_region, None),
        "part_size_mb": (_integer(5, 5120), 16),
        "max_concurrency": (_integer(1, 64), 32),
        "checksum_algorithm": (_checksum_algorithm, "CRC32"),
    },
    "imds": {
        # Default: the provider's (DEFAULT_METADATA_URLS), filled in by build().
        "url": (_metadata_url, None),
        "poll_interval": (_number(0.05, 60.0), 1.0),
        "token_ttl": (_integer(1, 21600), 21600),
        "provider": (_provider, "aws"),
    },
    "daemon": {
        "runtime_dir": (_path, Path("/run/spot-supervisor")),
        "stop_budget": (_number(1.0, 3600.0), 90.0),
        "safety_margin": (_number(0.0, 600.0), 5.0),
        "rescan_interval": (_number(0.1, 3600.0), 30.0),
        "max_restarts": (_integer(0, 1000), 5),
        "restart_window": (_number(1.0, 86400.0), 600.0),
        # Seconds without a new complete checkpoint before a running trainer counts as
        # hung (killed, restarted like a crash); 0 turns the check off.
        "progress_timeout": (_number(0.0, 7 * 86400.0), 0.0),
        # A slot's lease unrenewed this long (as a standby watches it) may be taken over.
        "lease_ttl": (_number(3.0, 3600.0), 30.0),
        # The exit code after an orderly drain on a cloud notice (0-255, not 2).
        "exit_code_after_notice": (_exit_code, 0),
    },
    "metrics": {
        # A Prometheus textfile for node_exporter's textfile collector (*.prom).
        "textfile": (_prom_path, None),
    },
    "azure": {
        # Approve this VM's Preempt/Terminate event after the emergency commit.
        "approve_after_commit": (_boolean, True),
        # The storage account for az:// remotes without a connection string.
        "account_url": (_account_url, None),
    },
}


# Keys whose value is a string: from the environment they are taken as they are, so
# SPOT_SUPERVISOR_RUN_ID=12345 is the run "12345", not the integer 12345.
_STRING_PARSERS: frozenset[Parser] = frozenset(
    {
        _string, _nonempty_string, _run_id, _path, _prom_path, _checksum_algorithm, _remote,
        _endpoint_url, _region, _metadata_url, _account, _node_id, _provider, _account_url,
    }
)  # fmt: skip


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
    if parse in _STRING_PARSERS and not isinstance(value, str):
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
            elif default is _REQUIRED:
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
