"""The trainer as a child process: own session, polite signals to the main pid, SIGKILL of
the whole tree at the deadline, always reaped. Real processes, real signals."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from structlog.testing import capture_logs

from daemon import runas
from daemon.child import TrainerProcess, child_environment, is_torch_launcher


def script(tmp_path: Path, body: str) -> tuple[str, ...]:
    p = tmp_path / "child.py"
    p.write_text(body)
    return (sys.executable, str(p))


def wait_for(path: Path, timeout: float = 20.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


# A parent that records SIGTERM and waits, with a worker that would record SIGTERM too.
PARENT_WITH_WORKER = """
import os, signal, subprocess, sys, time
out = sys.argv[1]
worker = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: open(sys.argv[1] + ".worker-term", "w").write("x"))
while True: time.sleep(0.1)
''', out])
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
open(out + ".pids", "w").write(f"{os.getpid()} {worker.pid} {os.getsid(0)}")
while not got:
    time.sleep(0.02)
open(out + ".parent-term", "w").write("x")
time.sleep(0.5)  # the worker would have been hit by a group-wide SIGTERM by now
sys.exit(0)
"""


def test_own_session_and_sigterm_to_main_pid_only(tmp_path: Path) -> None:
    out = tmp_path / "mark"
    child = TrainerProcess((*script(tmp_path, PARENT_WITH_WORKER), str(out)), os.environ, None)
    pid = child.start()
    parent_pid, worker_pid, sid = map(int, wait_for(Path(f"{out}.pids")).split())
    assert parent_pid == pid
    assert sid == pid != os.getsid(0)  # its own session, not ours
    assert child.send(signal.SIGTERM)
    status = child.wait(timeout=20)
    assert status is not None and status.success
    assert Path(f"{out}.parent-term").exists()
    assert not Path(f"{out}.worker-term").exists()  # the data-loader worker was spared
    psutil.Process(worker_pid).kill()


ORPHANING_TREE = """
import os, subprocess, sys, time
out = sys.argv[1]
# A grandchild whose parent exits at once: it is orphaned, but stays in our session.
mid = subprocess.Popen([sys.executable, "-c", '''
import subprocess, sys
ign = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
g = subprocess.Popen([sys.executable, "-c", ign])
open(sys.argv[1] + ".grandchild", "w").write(str(g.pid))
''', out])
mid.wait()
w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(out + ".worker", "w").write(str(w.pid))
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a trainer that ignores SIGTERM
while True:
    time.sleep(0.1)
"""


def test_kill_tree_kills_descendants_and_orphans_and_reaps(tmp_path: Path) -> None:
    out = tmp_path / "mark"
    child = TrainerProcess((*script(tmp_path, ORPHANING_TREE), str(out)), os.environ, None)
    child.start()
    grandchild = int(wait_for(Path(f"{out}.grandchild")))
    worker = int(wait_for(Path(f"{out}.worker")))
    child.send(signal.SIGTERM)
    assert child.wait(timeout=0.5) is None  # ignored
    with capture_logs() as logs:
        status = child.kill_tree("test deadline")
    assert status is not None and status.signal_name == "SIGKILL"
    for pid in (grandchild, worker):
        end = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < end, f"pid {pid} survived kill_tree"
            time.sleep(0.05)
    events = {e["event"]: e for e in logs}
    assert events["child_tree_killed"]["killed"] >= 3
    assert events["child_exited"]["signal"] == "SIGKILL"


@pytest.mark.parametrize(
    ("code", "describe"),
    [("sys.exit(3)", "exit code 3"), ("os.kill(os.getpid(), 9)", "killed by SIGKILL")],
)
def test_exit_code_or_signal_is_recorded(tmp_path: Path, code: str, describe: str) -> None:
    child = TrainerProcess(script(tmp_path, f"import os, sys\n{code}\n"), os.environ, None)
    with capture_logs() as logs:
        child.start()
        status = child.wait(timeout=20)
    assert status is not None and status.describe() == describe
    exited = [e for e in logs if e["event"] == "child_exited"]
    assert len(exited) == 1 and exited[0]["returncode"] == status.returncode
    assert not psutil.pid_exists(status.pid) or psutil.Process(status.pid).status() != "zombie"


def test_child_environment_strips_systemd_and_adds_ours() -> None:
    env = child_environment(
        {"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2"},
        {"HF_HOME": "/h"},
        {"SPOT_RUN_ID": "r"},
    )
    assert env == {
        "PATH": "/bin",
        "HF_HOME": "/h",
        "SPOT_RUN_ID": "r",
        # torchrun's own SIGKILL of its workers must not come before our drain deadline.
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3600",
    }


def test_a_torchrun_shutdown_timeout_the_user_chose_is_kept() -> None:
    from_service = child_environment({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "50"}, {}, {})
    from_config = child_environment({}, {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "70"}, {})
    assert from_service["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "50"
    assert from_config["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "70"


@pytest.mark.parametrize(
    ("cmdline", "launcher"),
    [
        (["/venv/bin/python", "/venv/bin/torchrun", "--nproc-per-node=8", "train.py"], True),
        (["torchrun", "--standalone", "train.py"], True),
        (["python3", "-u", "-m", "torch.distributed.run", "train.py"], True),
        (["python", "-m", "torch.distributed.launch", "train.py"], True),
        (["python", "-m", "trainer.example", "--steps", "5"], False),
        (["python", "train.py", "torchrun"], False),
        (["/bin/bash", "-c", "torchrun train.py"], False),
        ([], False),
    ],
)
def test_torchrun_is_recognised_by_its_command_line(cmdline: list[str], launcher: bool) -> None:
    assert is_torch_launcher(cmdline) is launcher


def test_unexecutable_command_raises_oserror(tmp_path: Path) -> None:
    child = TrainerProcess((str(tmp_path / "missing-binary"),), os.environ, None)
    with pytest.raises(OSError):
        child.start()


# --- run.user: the child drops privileges, the supervisor does not ---------------------

needs_root_and_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or not runas.can_switch(), reason="needs root (CAP_SETUID, CAP_SETGID)"
)


def world_searchable_dir() -> Path:
    """pytest's tmp_path sits under a 0700 dir: make one another user can reach."""
    d = Path(tempfile.mkdtemp(prefix="spot-runas-"))
    d.chmod(0o755)
    return d


@needs_root_and_nobody
def test_child_runs_as_run_user_with_its_groups_and_home(tmp_path: Path) -> None:
    group = "video" if _has_group("video") else None
    who = runas.resolve("nobody", group)
    out = world_searchable_dir() / "mine"
    runas.hand_over(out, who)
    report = 'echo "$(id -u) $(id -g) $(id -G) $HOME $USER $LOGNAME" > "$0/whoami"'
    try:
        child = TrainerProcess(
            ("/bin/sh", "-c", report, str(out)),
            {**os.environ, **who.environ()},
            None,
            run_as=who,
        )
        assert child.start() > 0
        status = child.wait(timeout=20)
        assert status is not None and status.success, status
        uid, gid, *rest = (out / "whoami").read_text().split()
        groups, (home, user, logname) = rest[:-3], rest[-3:]
        assert (int(uid), int(gid)) == (who.uid, who.gid) != (0, 0)
        # Exactly the user's groups from the group database: none of root's (0) leak in.
        assert {int(g) for g in groups} == {who.gid, *who.groups}
        assert 0 not in {int(g) for g in groups}
        assert (home, user, logname) == (who.home, "nobody", "nobody")
        assert (out / "whoami").stat().st_uid == who.uid
    finally:
        shutil.rmtree(out.parent)


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@needs_root_and_nobody
def test_hand_over_follows_no_link_the_user_planted(tmp_path: Path) -> None:
    who = runas.resolve("nobody")
    ckpt, outside = tmp_path / "ckpt", tmp_path / "outside"
    (ckpt / "step-000000001").mkdir(parents=True)
    (ckpt / "step-000000001" / "model.pt").write_bytes(b"w")
    outside.mkdir()
    (outside / "secret").write_text("root's")
    (ckpt / "link-to-dir").symlink_to(outside)
    (ckpt / "link-to-file").symlink_to(outside / "secret")
    os.link(outside / "secret", ckpt / "hard-link")
    runas.hand_over(ckpt, who)
    for p in (ckpt, ckpt / "step-000000001", ckpt / "step-000000001" / "model.pt"):
        assert p.stat().st_uid == who.uid
    assert (ckpt / "link-to-dir").lstat().st_uid == who.uid  # the link itself
    assert outside.stat().st_uid == (outside / "secret").stat().st_uid == 0  # not its target
