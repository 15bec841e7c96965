"""The configuration's schema: every section and key, the parser of its value
(:mod:`daemon.config_values`) and its default (:data:`REQUIRED` when it has none).

One table, so that the file, the environment and the flags are checked alike, and the
unknown key is refused in each. The dataclasses the rest of the daemon reads, and the
loading, are :mod:`daemon.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.config_values import (
    Parser,
    _account,
    _account_url,
    _argv,
    _boolean,
    _checksum_algorithm,
    _endpoint_url,
    _env_map,
    _exit_code,
    _integer,
    _metadata_url,
    _node_id,
    _nonempty_string,
    _number,
    _path,
    _prom_path,
    _provider,
    _region,
    _remote,
    _run_id,
    _string,
)

REQUIRED = object()
"""The default of a key that must be given."""

SCHEMA: dict[str, dict[str, tuple[Parser, Any]]] = {
    "run": {
        "id": (_run_id, REQUIRED),
        "command": (_argv, REQUIRED),
        "workdir": (_path, None),
        "env": (_env_map, {}),
        "user": (_account, None),
        "group": (_account, None),
        "nodes": (_integer(1, 1024), 1),
        "node_id": (_node_id, None),
    },
    "checkpoints": {
        "local_dir": (_path, REQUIRED),
        "remote": (_remote, REQUIRED),
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
STRING_PARSERS: frozenset[Parser] = frozenset(
    {
        _string, _nonempty_string, _run_id, _path, _prom_path, _checksum_algorithm, _remote,
        _endpoint_url, _region, _metadata_url, _account, _node_id, _provider, _account_url,
    }
)  # fmt: skip
