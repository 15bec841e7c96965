"""The frameworks are an optional extra: nothing imports them unless asked to.

With transformers, lightning and accelerate made unimportable, ``trainer``,
``trainer.checkpoint``, ``trainer.example``, ``trainer.integrations`` (and its torch-only
``data`` module) and the supervisor's modules all import; a framework module then fails
with an ImportError naming the framework. The supervisor never imports one even when
they are installed. The extra pins torch as the others do, and ``make install`` installs it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib
from integration_runs import REPO, script_env

FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "accelerate")

BLOCK = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked by the test")
        return None
sys.meta_path.insert(0, Block())
"""


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_trainer_imports_without_the_frameworks() -> None:
    code = (
        BLOCK.format(blocked=FRAMEWORKS)
        + """
import trainer, trainer.checkpoint, trainer.example, trainer.integrations
import trainer.integrations.data
import daemon.cli, daemon.supervisor, daemon.storage.sync
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
for name in ("trainer.integrations.huggingface", "trainer.integrations.lightning",
             "trainer.example_accelerate"):
    try:
        __import__(name)
    except ImportError as exc:
        print(name, "ImportError", exc)
    else:
        raise AssertionError(name + " imported without its framework")
print("ok")
"""
    )
    r = _python(code)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok")
    assert "trainer.integrations.huggingface ImportError transformers" in r.stdout


def test_the_supervisor_never_imports_a_framework_or_torch() -> None:
    r = _python(
        "import sys, daemon.cli, daemon.supervisor, daemon.storage.sync, daemon.storage.download\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {(*FRAMEWORKS, 'torch')!r})\n"
        "assert not bad, bad\n"
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_extra_pins_torch_and_make_install_installs_it() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra = project["project"]["optional-dependencies"]["integrations"]
    assert "torch==2.13.0" in extra
    names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0] for req in extra}
    assert {"transformers", "accelerate", "lightning"} <= names
    # Every subpackage is found (trainer.integrations among them), not listed by hand.
    assert "trainer*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    makefile = (REPO / "Makefile").read_text()
    installs = [ln for ln in makefile.splitlines() if "pip install" in ln and " -e " in ln]
    assert installs and all("integrations" in ln for ln in installs), installs


def test_integration_modules_are_in_the_package() -> None:
    root = Path(REPO / "trainer" / "integrations")
    assert {p.name for p in root.glob("*.py")} >= {
        "__init__.py",
        "data.py",
        "huggingface.py",
        "lightning.py",
    }
