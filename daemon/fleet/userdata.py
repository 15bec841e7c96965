"""``spot-supervisor user-data``: the cloud-init user-data that starts one run on an instance.

An instance of the spot-supervisor AMI (``systemd/packer``) has the unit enabled and an
example config; the user-data makes it this run's instance:

- ``/etc/spot-supervisor/config.toml``: the run's config, validated here and written as
  canonical TOML (comments dropped, values as parsed), carried base64-encoded so that
  nothing is ever hand-escaped into YAML;
- ``/etc/spot-supervisor/environment``: the launcher's three values, the run id, the
  remote (bucket and prefix) and the node count. The unit reads this file and the
  environment wins over the file (CONTRACT §2), so an instance always trains the run its
  instance role may write, with as many nodes as its Auto Scaling group keeps;
- then ``spot-supervisor check`` into the cloud-init log and ``systemctl start``.

The CloudFormation template ``deploy/aws/spot-training.yaml`` builds its user-data from
:data:`USER_DATA_TEMPLATE` word for word (``Fn::Sub`` there, :func:`substitute` here); its
parameters are what ``--cfn-parameters`` prints. Tests hold
the two to each other, and read the user-data back from an instance moto launched.
"""

from __future__ import annotations

import base64
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import RUN_ID_RE, build, read_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_PATH = "/etc/spot-supervisor/config.toml"
ENVIRONMENT_PATH = "/etc/spot-supervisor/environment"
SPOT_SUPERVISOR = "/opt/spot-supervisor/venv/bin/spot-supervisor"

# CloudFormation: a parameter value is at most 4,096 bytes. EC2: user data is at most
# 16 KB before base64.
CFN_PARAMETER_LIMIT = 4096
USER_DATA_LIMIT = 16 * 1024

# What the stack accepts (the template's AllowedPattern says the same; a test checks).
# AWS bucket names: 3-63 of a-z 0-9 . -, starting and ending with a letter or digit.
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
# A prefix of S3's "safe" key characters, segments joined by single "/": no "*" or "?",
# which would be wildcards in the IAM policy's resource ARN, no empty segment.
PREFIX_PATTERN = r"^[A-Za-z0-9!_.'()-]+(/[A-Za-z0-9!_.'()-]+)*$"
RUN_ID_PATTERN = RUN_ID_RE.pattern

USER_DATA_TEMPLATE = """\
#cloud-config
# spot-supervisor: run ${RunId}. Made by `spot-supervisor user-data`; the
# CloudFormation template deploy/aws/spot-training.yaml writes the same text.
write_files:
  # The run's config, as `spot-supervisor user-data` validated it (base64 TOML).
  - path: /etc/spot-supervisor/config.toml
    owner: root:root
    permissions: "0640"
    encoding: b64
    content: "${RunConfig}"
  # The launcher's values. The unit reads this file, and the environment wins over
  # config.toml: the instance trains the run its role may write, with the group's nodes.
  - path: /etc/spot-supervisor/environment
    owner: root:root
    permissions: "0640"
    content: |
      SPOT_SUPERVISOR_RUN_ID=${RunId}
      SPOT_SUPERVISOR_CHECKPOINTS_REMOTE=s3://${Bucket}/${Prefix}
      SPOT_SUPERVISOR_RUN_NODES=${Nodes}
runcmd:
  # Preflight, one line per check, into /var/log/cloud-init-output.log. The unit starts
  # either way and refuses a bad config itself (exit 2, the key named in its journal).
  - - sh
    - -c
    - set -a && . /etc/spot-supervisor/environment && exec "$0" check
    - /opt/spot-supervisor/venv/bin/spot-supervisor
  # --no-block: cloud-init must not wait out the restore.
  - [systemctl, start, --no-block, spot-supervisor.service]
"""


class UserDataError(ValueError):
    """The config cannot be launched this way; the message says what and why."""


@dataclass(frozen=True)
class Launch:
    """One run as a launcher sees it: the stack's parameters, or the user-data's values."""

    run_id: str
    bucket: str
    prefix: str
    nodes: int
    run_config: str  # base64 of the canonical config TOML

    def cfn_parameters(self) -> dict[str, str]:
        """The template's parameters this run fixes (``--parameter-overrides`` words)."""
        return {
            "RunId": self.run_id,
            "Bucket": self.bucket,
            "Prefix": self.prefix,
            "Nodes": str(self.nodes),
            "RunConfig": self.run_config,
        }

    def user_data(self) -> str:
        """The cloud-config text, exactly what the stack's launch template carries."""
        return substitute(USER_DATA_TEMPLATE, self.cfn_parameters())


def substitute(template: str, values: Mapping[str, str]) -> str:
    """``Fn::Sub`` of ``${Name}`` only: a bare ``$`` (``"$0"`` in a shell line) stays."""
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m[1]], template)


def launch_from_file(path: Path) -> Launch:
    """Read and validate a run's config file, and split what the launcher needs out of it.

    The file is validated alone: the environment of the machine running this command (an
    operator's laptop) does not travel to the instance, so it must not change the result.
    """
    doc = read_toml(path)
    cfg = build(doc, environ={}, source=str(path))
    bucket, prefix = split_remote(cfg.checkpoints.remote)
    run = doc.get("run", {})
    nodes = run.get("nodes", 1) if isinstance(run, dict) else 1
    toml_text = dump_toml(doc)
    encoded = base64.b64encode(toml_text.encode("utf-8")).decode("ascii")
    if len(encoded) > CFN_PARAMETER_LIMIT:
        raise UserDataError(
            f"{path}: the config is {len(encoded)} bytes in base64, over CloudFormation's"
            f" {CFN_PARAMETER_LIMIT}-byte limit for a parameter; shorten it (long run.env"
            " values belong in a file the training command reads)"
        )
    launch = Launch(cfg.run.id, bucket, prefix, int(nodes), encoded)
    check_round_trip(launch)
    size = len(launch.user_data().encode("utf-8"))
    if size > USER_DATA_LIMIT:  # pragma: no cover - the parameter limit is hit first
        raise UserDataError(f"{path}: the user-data is {size} bytes, over EC2's 16 KB limit")
    return launch


def split_remote(remote: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` as (bucket, prefix), held to what the stack can scope."""
    m = re.match(r"^s3://([^/]+)/*(.*?)/*$", remote)
    if not m:
        raise UserDataError(f"checkpoints.remote: {remote!r} is not s3://bucket/prefix")
    bucket, prefix = m[1], m[2]
    if not re.match(BUCKET_PATTERN, bucket) or ".." in bucket:
        raise UserDataError(
            f"checkpoints.remote: {bucket!r} is not an AWS bucket name (3-63 of a-z 0-9 . -,"
            " starting and ending with a letter or digit); the stack launches on AWS S3"
        )
    if not prefix:
        raise UserDataError(
            f"checkpoints.remote: {remote!r} has no prefix; the stack's instance role is"
            " scoped to one (s3://bucket/<prefix>), so put the runs under one"
        )
    if not re.match(PREFIX_PATTERN, prefix):
        raise UserDataError(
            f"checkpoints.remote: prefix {prefix!r} may hold only A-Z a-z 0-9 ! _ . ' ( ) -"
            " in segments joined by single '/' (the IAM policy's resource names it)"
        )
    return bucket, prefix


# --- canonical TOML --------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
    '"': '\\"',
    "\\": "\\\\",
}


def dump_toml(doc: Mapping[str, Any]) -> str:
    """The config document as TOML: one table per section, values as tomllib parsed them.

    Covers what the config schema holds (strings, integers, finite floats, booleans,
    lists and tables of those); anything else is refused, naming the key.
    """
    out: list[str] = []
    for section, table in doc.items():
        if not isinstance(table, Mapping):
            raise UserDataError(f"[{section}]: expected a table")
        if out:
            out.append("")
        out.append(f"[{_key(section)}]")
        for key, value in table.items():
            out.append(f"{_key(key)} = {_value(f'{section}.{key}', value)}")
    return "\n".join(out) + "\n"


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _string(k)


def _string(s: str) -> str:
    parts = []
    for c in s:
        if c in _ESCAPES:
            parts.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:  # TOML forbids raw control characters
            parts.append(f"\\u{ord(c):04x}")
        else:
            parts.append(c)
    return '"' + "".join(parts) + '"'


def _value(name: str, v: Any) -> str:
    if isinstance(v, bool):  # before int: bool is an int
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise UserDataError(f"{name}: {v!r} has no place in the config")
        return repr(v)  # shortest round-tripping form; TOML reads 1e-05 and 0.5 alike
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(name, x) for x in v) + "]"
    if isinstance(v, dict):
        items = ", ".join(f"{_key(k)} = {_value(f'{name}.{k}', x)}" for k, x in v.items())
        return "{ " + items + " }" if items else "{}"
    raise UserDataError(f"{name}: a {type(v).__name__} cannot be written back as TOML")


def read_user_data(text: str) -> tuple[str, dict[str, str]]:
    """The config TOML and the environment lines inside user-data this module made.

    It reads this module's own layout only (the base64 ``content`` line and the
    ``KEY=value`` block), not YAML in general: enough to check what we wrote.
    """
    m = re.search(r'^    content: "([A-Za-z0-9+/=]*)"$', text, re.MULTILINE)
    if not m:
        raise UserDataError("no base64 config.toml content in this user-data")
    toml_text = base64.b64decode(m[1], validate=True).decode("utf-8")
    env = dict(re.findall(r"^      (SPOT_SUPERVISOR_[A-Z_]+)=(.*)$", text, re.MULTILINE))
    return toml_text, env


def check_round_trip(launch: Launch) -> None:
    """The config on the instance is the config validated here, with the launcher's values."""
    toml_text, env = read_user_data(launch.user_data())
    build(tomllib.loads(toml_text), environ=env)
