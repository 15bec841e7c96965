"""A throwaway systemd as PID 1 of a new PID and mount namespace, for tests.

See ../shared/SYSTEMD-SANDBOX.md. The danger: a systemd that shares the host's /tmp runs
systemd-tmpfiles and empties it. So before systemd starts, the namespace gets private
tmpfs mounts over every place it writes, and the tmpfiles units are masked. Only the
target written here boots (journald and what a test starts), nothing of the host's.

Everything else (the venv, the code, loopback servers the test started) is shared with
the host. Teardown is ``kill -KILL`` of the namespace's PID 1, the one process this
module started; the kernel then ends every process of the namespace.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
TMPFS_DIRS = ("/run", "/tmp", "/var/tmp", "/var/log", "/var/lib/systemd")
MASKED = (
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-tmpfiles-setup-dev.service",
)
TARGET = "spot-sandbox.target"
UNSHARE = ("unshare", "--pid", "--fork", "--mount", "--propagation", "private")
UNIT_DIR = "/run/systemd/system"  # private to the namespace (a tmpfs)


def unavailable_reason() -> str | None:
    """Why a real systemd cannot boot here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to create PID and mount namespaces"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux)"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed"
    return None


def _under_tmpfs(path: Path) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in TMPFS_DIRS)


def kept_paths() -> list[Path]:
    """The checkout and the venv, when they live where the sandbox mounts a tmpfs.

    A clone under /tmp (CI may make one there) would vanish under the sandbox's tmpfs,
    and with it the venv the unit runs: those are bound back on top.
    """
    wanted = {REPO.resolve(), Path(sys.prefix).resolve()}
    keep = sorted(p for p in wanted if _under_tmpfs(p))
    return [p for p in keep if not any(q in p.parents for q in keep)]


def _boot_script() -> str:
    lines = ["set -e", "mount -t proc proc /proc"]
    keep = kept_paths()
    # A holder outside every tmpfs'd dir (the mounts are private to the namespace).
    hold = f"/dev/shm/spot-sandbox-hold-{os.getpid()}-{time.monotonic_ns()}"
    for i, p in enumerate(keep):
        lines += [f"mkdir -p {hold}/{i}", f"mount --bind '{p}' {hold}/{i}"]
    lines += [f"mount -t tmpfs tmpfs {d}" for d in TMPFS_DIRS]
    for i, p in enumerate(keep):
        lines += [f"mkdir -p '{p}'", f"mount --bind {hold}/{i} '{p}'", f"umount {hold}/{i}"]
    if keep:
        lines.append(f"rm -rf {hold}")
    lines.append(f"mkdir -p {UNIT_DIR}")
    lines += [f"ln -sf /dev/null {UNIT_DIR}/{unit}" for unit in MASKED]
    target = (
        "[Unit]\\nDescription=spot-supervisor test sandbox\\nDefaultDependencies=no\\n"
        "Wants=systemd-journald.socket systemd-journald.service\\n"
        "After=systemd-journald.socket\\n"
    )
    lines.append(f"printf '{target}' > {UNIT_DIR}/{TARGET}")
    lines.append(
        f"exec env container=other {SYSTEMD} --system --unit={TARGET} --log-target=console"
    )
    return "\n".join(lines) + "\n"


@dataclass
class Sandbox:
    """One booted systemd; drive it with :meth:`systemctl`, :meth:`journalctl`, :meth:`sh`."""

    workdir: Path
    pid: int = 0
    _unshare: subprocess.Popen[bytes] | None = None
    _console: Path = field(default=Path("/dev/null"))

    def boot(self, timeout: float = 30.0) -> Sandbox:
        self.workdir.mkdir(parents=True, exist_ok=True)
        script = self.workdir / "boot.sh"
        script.write_text(_boot_script())
        self._console = self.workdir / "console.log"
        with self._console.open("wb") as console:
            self._unshare = subprocess.Popen(
                [*UNSHARE, "/bin/sh", str(script)],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        end = time.monotonic() + timeout
        while not self.pid:
            self.pid = self._namespace_init()
            self._check_alive(end, "the namespace's PID 1 to appear")
        # systemctl answers once the manager is up; the target is active once journald is.
        while True:
            r = self.run(["systemctl", "is-active", TARGET], check=False)
            if r.stdout.strip() == "active":
                break
            self._check_alive(end, f"{TARGET} to become active")
        return self

    def _namespace_init(self) -> int:
        assert self._unshare is not None
        children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            pids = []
        return int(pids[0]) if pids else 0

    def _check_alive(self, end: float, what: str) -> None:
        assert self._unshare is not None
        if self._unshare.poll() is not None:
            raise RuntimeError(f"systemd sandbox died while waiting for {what}:\n{self.console()}")
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}:\n{self.console()}")
        time.sleep(0.05)

    def console(self) -> str:
        try:
            return self._console.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def run(
        self, argv: list[str], *, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (its mounts and PIDs)."""
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-p", *argv]
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{shlex.join(argv)} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
            )
        return r

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def journalctl(self, *args: str) -> str:
        return self.run(["journalctl", "--no-pager", *args]).stdout

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-c", script], check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *[f"--property={p}" for p in props]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def install_unit(self, name: str, text: str) -> None:
        """Write a unit into the namespace's private /run/systemd/system and reload."""
        self.run(["/bin/sh", "-c", f"cat > {UNIT_DIR}/{name} <<'EOF'\n{text}\nEOF"])
        self.systemctl("daemon-reload")

    def teardown(self) -> None:
        """SIGKILL the namespace's PID 1 (this module's own child): it takes every
        process of the namespace with it. Never anything else."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._unshare is not None:
            if not self.pid and self._unshare.poll() is None:
                # systemd never appeared: end the unshare we started, by its own pid.
                self._unshare.kill()
            try:
                self._unshare.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._unshare.kill()
                self._unshare.wait()


# --- a staging install (systemd/install.sh --root), shared by the unit and install tests --

REPO = Path(__file__).resolve().parent.parent
INSTALL_SH = REPO / "systemd" / "install.sh"
STAGE_DIR = REPO / ".pytest_cache" / "install-stage"


@dataclass
class Staged:
    """A staging root that ``install.sh --root`` filled, and how to run it again."""

    root: Path
    wheel: Path
    python: str
    first_output: str

    def install(self, *extra: str, python: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_install(self.root, self.wheel, python or self.python, *extra)


def base_python() -> str:
    """The interpreter under this venv: what an operator would name with --python."""
    return str(Path(getattr(sys, "_base_executable", sys.executable)).resolve())


def run_install(
    root: Path, wheel: Path, python: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    # Offline and --no-deps: the test installs the project's own wheel into a fresh venv
    # of an explicit Python without an index (the dependencies are not needed for
    # --version, and the suite must not need the network).
    argv = [str(INSTALL_SH), "--root", str(root), "--python", python]
    argv += ["--package", str(wheel), "--no-deps", "--offline", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


_staged: Staged | None = None
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation")
PIP_WHEEL += ("--no-index",)


def staged_install() -> Staged:
    """Build this checkout's wheel and run install.sh into a staging root, once a session.

    The root also gets the host's own unit files under /usr/lib/systemd/system, as a
    base image would have them, so ``systemd-analyze verify --root`` resolves
    network-online.target and multi-user.target there.
    """
    global _staged
    if _staged is not None:
        return _staged
    shutil.rmtree(STAGE_DIR, ignore_errors=True)
    src, wheels, root = STAGE_DIR / "src", STAGE_DIR / "wheels", STAGE_DIR / "root"
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*_cache"
    )
    shutil.copytree(REPO, src, ignore=ignore)
    subprocess.run(
        [*PIP_WHEEL, "--wheel-dir", str(wheels), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheels.glob("spot_supervisor-*.whl"))
    shutil.copytree(
        SYSTEMD.parent / "system", root / "usr" / "lib" / "systemd" / "system", symlinks=True
    )
    r = run_install(root, wheel, base_python())
    if r.returncode != 0:
        raise AssertionError(f"install.sh exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    _staged = Staged(root, wheel, base_python(), r.stdout)
    return _staged
