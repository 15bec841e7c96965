"""The import boundaries of the design: daemon/ never imports torch, trainer/ never boto3."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import daemon

REPO = Path(__file__).resolve().parent.parent


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    return {m.split(".")[0] for m in out.split()}


def daemon_modules() -> list[str]:
    """Every module of the daemon package, subpackages included."""
    found = pkgutil.walk_packages(daemon.__path__, prefix="daemon.")
    return sorted(m.name for m in found if not m.name.endswith("__main__"))


def test_no_daemon_module_imports_torch() -> None:
    names = daemon_modules()
    assert "daemon.supervisor" in names and "daemon.standins.demo" in names
    loaded = imported_after("\n".join(f"import {n}" for n in names))
    assert "torch" not in loaded


# A finder that refuses the stand-ins, as if the package were not installed.
_BLOCK_STANDINS = """
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "daemon.standins" or name.startswith("daemon.standins."):
            raise ImportError(f"{name} is test tooling")
        return None
sys.meta_path.insert(0, _Refuse())
"""


def test_production_code_never_imports_the_standins() -> None:
    """The stand-ins (moto launcher, metadata emulator, fault proxy, demo) are test and
    demo tooling: the daemon imports and runs without them."""
    production = [n for n in daemon_modules() if not n.startswith("daemon.standins")]
    code = _BLOCK_STANDINS + "\n".join(f"import {n}" for n in production)
    code += "\nfrom daemon.cli import main\nfrom daemon.supervisor import Supervisor"
    loaded = imported_after(code)
    assert "daemon" in loaded and "moto" not in loaded


def test_trainer_does_not_import_boto3() -> None:
    loaded = imported_after("import trainer, trainer.example")
    assert "torch" in loaded  # the probe really loaded the trainer
    assert "boto3" not in loaded and "botocore" not in loaded
