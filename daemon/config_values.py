"""What each configuration value accepts: the parsers the schema (:mod:`daemon.config_schema`)
names for its keys.

Each parser takes ``(key, value)`` and returns the value as the config holds it, or
raises :class:`ConfigError` whose message names the key and why. They check one value
each, against the rules of whatever will use it (the OS, botocore, the metadata client,
storage), so a value the run would refuse is refused at load. What does not live here:
the layers and their merging, and the rules between keys (:mod:`daemon.config`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.storage.locations import AZURE_CONTAINER_RE, BUCKET_RE, GCS_BUCKET_RE

RUN_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
PROVIDERS = ("aws", "gcp", "azure")


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key (or file) and why."""


Parser = Callable[[str, Any], Any]
"""``parse(key, value)``: the value as the config holds it, or ConfigError naming ``key``."""


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


# The bucket and container name rules of the storage layer itself (daemon.storage.locations
# imports only the standard library, so loading a config still pulls in no SDK).
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
    if scheme == "s3" and not BUCKET_RE.match(bucket):
        raise ConfigError(
            f"{key}: {bucket!r} is not a valid bucket name (3 to 255 of A-Z a-z 0-9 . _ -,"
            " starting with a letter or digit)"
        )
    if scheme == "gs" and (
        not GCS_BUCKET_RE.match(bucket)
        or (len(bucket) > 63 and "." not in bucket)
        or any(len(part) > 63 for part in bucket.split("."))
    ):
        raise ConfigError(
            f"{key}: {bucket!r} is not a valid GCS bucket name (3 to 63 of a-z 0-9 - _ .,"
            " up to 222 with dots, starting and ending with a letter or digit)"
        )
    if scheme == "az" and not AZURE_CONTAINER_RE.match(bucket):
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
    from daemon.notices.wire import parse_base_url  # the client's own rule: config agrees with it

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
