"""Azurite (npm ``azurite``, pinned in tests/npm/package.json) on loopback, for the tests
and ``spot-supervisor demo --cloud azure``.

Azurite is Microsoft's Azure Storage emulator; only its Blob service is started
(``azurite-blob``), in memory, with telemetry off (it would otherwise try to reach
Application Insights). ``make install`` installs it (``npm ci --prefix tests/npm``).
3.35.0 is pinned: later releases need Node 21+, and CI has Node 20. Nothing here runs
in production.

What Azurite 3.35.0 does not model (seen against it with azure-storage-blob 12.x, or
read in its source where marked):

- **API versions.** It refuses service versions newer than it knows; the launcher passes
  ``--skipApiVersionCheck`` so a newer SDK can talk to it.
- **Authentication** is the well-known development account (``devstoreaccount1``) and its
  published key; ``--loose`` ignores headers it does not know. No Entra ID (no
  DefaultAzureCredential), no RBAC: 403s are never produced.
- **Throttling and faults**: no 503 ServerBusy, no 500s, no slow first byte.
- **Copy Blob** completes synchronously and keeps ``Content-MD5``; on Azure a copy may be
  ``pending`` for a while (polled, see daemon/storage/azure_blob.py).
- **Uncommitted blocks** are kept in memory until the process ends; Azure discards them
  after a week.
- **Durability and consistency**: one process, in memory, strongly consistent.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from daemon.standins.npm import INSTALL_HINT as NPM_INSTALL_HINT
from daemon.standins.npm import NODE_MODULES, find_node, stop_server

INSTALL_HINT = (
    f"{NPM_INSTALL_HINT}; elsewhere `npm install azurite@3.35.0`"
    " and set SPOT_AZURITE_MAIN to its dist/src/blob/main.js"
)
MAIN_ENV = "SPOT_AZURITE_MAIN"
MAIN = NODE_MODULES / "azurite" / "dist" / "src" / "blob" / "main.js"

# The development account every Azurite has (published by Microsoft; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class AzuriteUnavailable(RuntimeError):
    """node or the azurite package is missing, or it did not start."""


@dataclass
class Azurite:
    """One Azurite Blob service process on ``blob_endpoint``."""

    blob_endpoint: str
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.blob_endpoint};"
        )

    def env(self) -> dict[str, str]:
        """What a process needs to reach it instead of Azure."""
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def create_container(self, name: str) -> None:
        from azure.storage.blob import BlobServiceClient  # the azure extra

        with BlobServiceClient.from_connection_string(self.connection_string) as svc:
            svc.create_container(name)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        stop_server(self.proc)


def _node() -> tuple[str, Path]:
    main = Path(os.environ.get(MAIN_ENV) or MAIN)
    return find_node("Azurite", main, INSTALL_HINT, AzuriteUnavailable), main


def start_azurite() -> Azurite:
    """Start Azurite's Blob service on a free 127.0.0.1 port, in memory, telemetry off."""
    node, main = _node()
    proc = subprocess.Popen(
        [
            node,
            str(main),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "NODE_PATH": str(main.parents[4])},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    port: int | None = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        m = re.search(r"successfully listens on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m[1])
            break
    if port is None:
        proc.kill()
        proc.wait()
        raise AzuriteUnavailable("Azurite did not start: " + " | ".join(lines[-5:]))

    def drain() -> None:  # keep its pipe from filling up
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())

    threading.Thread(target=drain, daemon=True).start()
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    return Azurite(f"http://127.0.0.1:{port}/{ACCOUNT}", proc, lines)
