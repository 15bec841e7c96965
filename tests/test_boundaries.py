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


def test_no_daemon_module_imports_torch() -> None:
    names = [m.name for m in pkgutil.iter_modules(daemon.__path__) if m.name != "__main__"]
    assert "supervisor" in names and "demo" in names
    loaded = imported_after("\n".join(f"import daemon.{n}" for n in names))
    assert "torch" not in loaded


def test_trainer_does_not_import_boto3() -> None:
    loaded = imported_after("import trainer, trainer.example")
    assert "torch" in loaded  # the probe really loaded the trainer
    assert "boto3" not in loaded and "botocore" not in loaded
