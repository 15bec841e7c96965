"""systemd/install.sh into a staging root (--root): the venv of an explicit Python >= 3.10,
the unit, the config only when absent, the enable symlink; twice, to show it is idempotent.

The first install (tests/systemd_sandbox.py: staged_install) is the real path: a fresh
venv, pip installing this checkout's wheel into it, offline and without dependencies.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from systemd_sandbox import INSTALL_SH, REPO, Staged, staged_install

from daemon import __version__

UNIT = "spot-supervisor.service"


@pytest.fixture(scope="module")
def staged() -> Staged:
    return staged_install()


def test_first_install_lays_out_venv_unit_config_and_enable(staged: Staged) -> None:
    root = staged.root
    venv = root / "opt/spot-supervisor/venv"
    assert "creating" in staged.first_output
    assert (root / "etc/systemd/system" / UNIT).read_text() == (REPO / "systemd" / UNIT).read_text()
    config = root / "etc/spot-supervisor/config.toml"
    assert config.read_text() == (REPO / "systemd/config.toml").read_text()
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    wants = root / "etc/systemd/system/multi-user.target.wants" / UNIT
    assert os.readlink(wants) == f"/etc/systemd/system/{UNIT}"
    # The venv is a real one of the Python we named, and its console script runs.
    version = subprocess.run(
        [str(venv / "bin/spot-supervisor"), "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.strip() == f"spot-supervisor {__version__}"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert f"home = {Path(staged.python).parent}" in cfg
    # Installed, not linked to this checkout: the package lives in the venv.
    found = subprocess.run(
        [str(venv / "bin/python"), "-I", "-c", "import daemon; print(daemon.__file__)"],
        capture_output=True,
        text=True,
    )
    assert found.stdout.startswith(str(venv)), found


def test_second_install_is_idempotent_and_keeps_the_config(staged: Staged) -> None:
    config = staged.root / "etc/spot-supervisor/config.toml"
    config.write_text(config.read_text().replace("llama-ft-001", "edited-by-operator"))
    unit = staged.root / "etc/systemd/system" / UNIT
    unit.write_text("stale\n")
    before = sorted(p.relative_to(staged.root) for p in staged.root.rglob("*"))
    r = staged.install()
    assert r.returncode == 0, r.stderr
    assert (
        "reusing" in r.stdout and "kept the existing /etc/spot-supervisor/config.toml" in r.stdout
    )
    assert "edited-by-operator" in config.read_text()  # never overwritten
    assert unit.read_text() == (REPO / "systemd" / UNIT).read_text()  # always ours
    after = sorted(p.relative_to(staged.root) for p in staged.root.rglob("*"))
    assert [p for p in after if "__pycache__" not in str(p)] == [
        p for p in before if "__pycache__" not in str(p)
    ]
    wants = staged.root / "etc/systemd/system/multi-user.target.wants" / UNIT
    assert os.readlink(wants) == f"/etc/systemd/system/{UNIT}"


def test_refuses_python_older_than_3_10(staged: Staged, tmp_path: Path) -> None:
    old = tmp_path / "python3.8"
    # Answers like a Python 3.8 would: the version check fails, the version is 3.8.10.
    old.write_text('#!/bin/sh\ncase "$2" in *platform*) echo 3.8.10 ;; *) exit 1 ;; esac\n')
    old.chmod(0o755)
    root = tmp_path / "root"
    r = subprocess.run(
        [str(INSTALL_SH), "--root", str(root), "--python", str(old), "--no-deps"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "3.8.10" in r.stderr and "3.10 or newer" in r.stderr
    assert not (root / "opt").exists()


def test_usage_errors_exit_2() -> None:
    r = subprocess.run([str(INSTALL_SH), "--frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "--frobnicate" in r.stderr
    r = subprocess.run([str(INSTALL_SH), "--root", "relative/dir"], capture_output=True, text=True)
    assert r.returncode == 2 and "absolute" in r.stderr
    r = subprocess.run([str(INSTALL_SH), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--root DIR" in r.stdout
