"""Servers from npm run with Node.js on loopback, for the tests, the bench and the demo.

s3rver (``tests/s3rver.py``) and Azurite (:mod:`daemon.standins.azurite`) are pinned in
``tests/npm/package.json`` and installed by ``make install`` (``npm ci --prefix
tests/npm``). What their launchers share lives here: where the packages are, finding
node and the package, stopping the process. What each server is, how it starts and what
it does not model stays with its launcher. Nothing here runs in production.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
NODE_MODULES = REPO / "tests" / "npm" / "node_modules"
INSTALL_HINT = "`make install` installs it (npm ci --prefix tests/npm)"


def find_node(server: str, needed: Path, hint: str, unavailable: type[Exception]) -> str:
    """The node executable, once ``needed`` (a file of ``server``'s package) is there
    too; else ``unavailable``, saying what is missing and ``hint``."""
    node = shutil.which("node")
    if node is None:
        raise unavailable(f"node is not installed; {server} needs it. {hint}")
    if not needed.is_file():
        raise unavailable(f"{server} is not installed ({needed} is missing); {hint}")
    return node


def stop_server(proc: subprocess.Popen[Any]) -> None:
    """Stop a server process: SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
