"""Files for operators and the trainer (state.json, the notice file, the Prometheus
textfile) are readable by other users whatever the umask: the unit sets UMask=0027, an
operator's shell may have 0077, and none of them holds a secret."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.metrics import Metrics, TextfileWriter
from daemon.state import Phase, StateMachine, write_json_atomic


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A dir other users can reach (pytest's tmp_path sits under a 0700 dir)."""
    d = Path(tempfile.mkdtemp(prefix="spot-operator-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def readable_by_nobody(path: Path) -> bool:
    """Whether another user (nobody) can read ``path``: a real process, not a mode guess."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as nobody")
    r = subprocess.run(["/bin/cat", str(path)], user="nobody", group="nogroup", extra_groups=[],
                       capture_output=True, text=True)  # fmt: skip
    return r.returncode == 0 and bool(r.stdout)


def test_state_json_is_world_readable_under_umask_0077(shared_dir: Path) -> None:
    state = shared_dir / "run" / "spot-supervisor" / "state.json"
    with umask(0o077):
        sm = StateMachine(state, "r")
        sm.transition(Phase.RESTORING, "boot")
    assert mode(state) == 0o644
    # The dirs the supervisor created for it can be searched too.
    assert mode(state.parent) == mode(state.parent.parent) == 0o755
    assert readable_by_nobody(state)


def test_notice_file_is_readable_by_an_unprivileged_trainer_under_umask_0077(
    shared_dir: Path,
) -> None:
    notice = shared_dir / "rt" / "notice.json"
    with umask(0o077):
        write_json_atomic(notice, {"action": "terminate", "deadline": "x", "source": "aws-imds"})
    assert mode(notice) == 0o644 and mode(notice.parent) == 0o755
    assert readable_by_nobody(notice)


def test_an_existing_dir_keeps_its_mode(shared_dir: Path) -> None:
    # The operator's (or systemd's RuntimeDirectoryMode=) choice for a dir that exists.
    (shared_dir / "rt").mkdir(mode=0o750)
    with umask(0o077):
        write_json_atomic(shared_dir / "rt" / "notice.json", {"a": 1})
    assert mode(shared_dir / "rt") == 0o750


def test_metrics_textfile_is_world_readable_under_umask_0077(shared_dir: Path) -> None:
    prom = shared_dir / "textfile" / "spot.prom"
    with umask(0o077):
        assert TextfileWriter(prom, Metrics(run_id="r")).write()
    assert mode(prom) == 0o644 and mode(prom.parent) == 0o755
    assert readable_by_nobody(prom)  # node_exporter runs as its own user
