"""The training command as the supervisor's child process.

The child runs in its own session, so a terminal's or systemd's signals to the
supervisor's process group do not reach it behind our back. Polite signals (SIGTERM,
SIGUSR1) go to its main pid only, so data-loader workers are not killed under it
(CONTRACT §3); under torchrun they go to the agent's workers instead (see
:meth:`TrainerProcess.send`). Only at the drain deadline is the whole tree SIGKILLed.
It is always reaped, and its exit code or signal is logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import structlog

from daemon.libc import libc_function
from daemon.runas import RunAs

log = structlog.get_logger(__name__)

# The supervisor removes these so the trainer cannot talk to systemd in our name.
_STRIPPED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (e.g. a dead trainer's workers) so we can kill and reap them."""
    prctl = libc_function("prctl", ctypes.c_int, *[ctypes.c_ulong] * 4)
    return prctl is not None and int(prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


@dataclass(frozen=True)
class ExitStatus:
    """How the child ended: an exit code, or the signal that killed it."""

    pid: int
    returncode: int

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    @property
    def success(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        name = self.signal_name
        return f"killed by {name}" if name else f"exit code {self.returncode}"


# torchrun forwards SIGTERM to its workers and SIGKILLs them this many seconds later
# (default 30): a large save would be killed half-written, long before our drain
# deadline. The supervisor's drain deadline must be the only clock, so unless the user
# chose a value, torchrun's is set far beyond any drain (SIGKILL of the tree still comes
# at the deadline).
TORCH_SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
TORCH_SHUTDOWN_TIMEOUT_S = 3600

TRAINER_TOKEN_ENV = "SPOT_SUPERVISOR_TRAINER_TOKEN"

_TORCH_LAUNCHER_SCRIPTS = frozenset({"torchrun"})
_TORCH_LAUNCHER_MODULES = frozenset({"torch.distributed.run", "torch.distributed.launch"})


def child_environment(
    base: Mapping[str, str], extra: Mapping[str, str], spot: Mapping[str, str]
) -> dict[str, str]:
    """The environment of the training command: ours, minus systemd's, plus the run's."""
    env = {k: v for k, v in base.items() if k not in _STRIPPED_ENV}
    env.setdefault(TORCH_SHUTDOWN_TIMEOUT_ENV, str(TORCH_SHUTDOWN_TIMEOUT_S))
    env.update(extra)
    env.update(spot)
    return env


def is_torch_launcher(cmdline: list[str]) -> bool:
    """Whether a process's command line is torchrun's elastic agent.

    ``torchrun ...`` runs as ``python /path/torchrun ...`` (its shebang), and
    ``python -m torch.distributed.run ...`` names the module.
    """
    if not cmdline:
        return False
    if os.path.basename(cmdline[0]) in _TORCH_LAUNCHER_SCRIPTS:
        return True
    args = iter(cmdline[1:])
    for arg in args:  # the interpreter's options, then its script or module
        if arg == "-m":
            return next(args, "") in _TORCH_LAUNCHER_MODULES
        if not arg.startswith("-"):
            return os.path.basename(arg) in _TORCH_LAUNCHER_SCRIPTS
    return False


def _is_rank(p: psutil.Process) -> bool:
    """A torchrun worker: torchrun gives each one its ``LOCAL_RANK``."""
    try:
        return "LOCAL_RANK" in p.environ()
    except psutil.Error:
        return False


class TrainerProcess:
    """One start of the training command; start it, signal it, reap it."""

    def __init__(
        self,
        argv: tuple[str, ...],
        env: Mapping[str, str],
        cwd: Path | None,
        run_as: RunAs | None = None,
    ) -> None:
        self.argv = argv
        self.run_as = run_as  # None: as the supervisor's own user
        # A token every process of this start inherits: how its leftovers are found even
        # after they left its session (torchrun's workers call setsid) and were reparented.
        self.token = secrets.token_hex(8)
        self.env = {**env, TRAINER_TOKEN_ENV: self.token}
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self.exit: ExitStatus | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> int:
        """Spawn the command in its own session; raises OSError when it cannot be executed.

        With ``run_as``, the child alone becomes that user between fork and exec; its
        supplementary groups are set too, or it would keep root's.
        """
        who = self.run_as
        self._proc = subprocess.Popen(
            list(self.argv),
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            user=who.uid if who else None,
            group=who.gid if who else None,
            extra_groups=list(who.groups) if who else None,
        )
        self.started_at = time.monotonic()
        user = {"user": who.user} if who else {}
        log.info("child_started", pid=self._proc.pid, argv=list(self.argv), **user)
        return self._proc.pid

    def poll(self) -> ExitStatus | None:
        """The exit status once the child has ended (and was reaped), else None."""
        if self.exit is not None:
            return self.exit
        if self._proc is None:
            return None
        rc = self._proc.poll()
        if rc is None:
            return None
        return self._record_exit(rc)

    def wait(self, timeout: float) -> ExitStatus | None:
        if self.exit is not None or self._proc is None:
            return self.exit
        try:
            rc = self._proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None
        return self._record_exit(rc)

    def _record_exit(self, rc: int) -> ExitStatus:
        assert self._proc is not None
        self.exit = ExitStatus(self._proc.pid, rc)
        log.info(
            "child_exited",
            pid=self._proc.pid,
            returncode=rc,
            signal=self.exit.signal_name,
            ran_seconds=round(time.monotonic() - self.started_at, 3),
        )
        return self.exit

    def send(self, sig: signal.Signals) -> bool:
        """A polite signal (SIGTERM, SIGUSR1) to the trainer; False if nobody got it.

        The trainer is the main pid (never its group), except under torchrun, where it
        is the agent's workers. The agent does not handle SIGUSR1, whose default action
        would kill it and orphan them; and it answers SIGTERM by forwarding it and
        SIGKILLing the workers 30 s later whatever they are doing (a fixed 30 s in torch
        releases before 2026; later ones read ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, which
        the child's environment sets). Signalled directly, the workers save and exit 0,
        and so does the agent. The trainer library agrees on stop and save across
        ranks, so ranks on other nodes stop and save at the same step too; they save to
        their own node's disk and exit 0 there, and that node's supervisor sees a trainer
        stopped by someone else (an ``interrupt`` save, not ``final``), commits it and
        starts it again. Several nodes committing one run is issue 12, not yet here.
        """
        if self._proc is None or self.poll() is not None:
            return False
        try:
            main = psutil.Process(self._proc.pid)
            launcher = is_torch_launcher(main.cmdline())
            targets = [c for c in main.children() if _is_rank(c)] if launcher else [main]
        except psutil.Error:
            return False
        if launcher and not targets:
            # Before its workers start there is no save to make; the agent forwards a
            # SIGTERM itself, while SIGUSR1 would kill it.
            if sig != signal.SIGTERM:
                log.warning(
                    "child_not_signalled",
                    pid=self._proc.pid,
                    signal=sig.name,
                    why=f"torchrun has no workers yet; {sig.name} would kill its agent",
                )
                return False
            targets = [main]
        sent = []
        for p in targets:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
                sent.append(p.pid)
        if sent:
            workers = {"workers": sent} if launcher and targets[0] is not main else {}
            log.info("child_signalled", pid=self._proc.pid, signal=sig.name, **workers)
        return bool(sent)

    def _tree(self) -> list[psutil.Process]:
        """Every live process of the child's tree: descendants, plus its session's members."""
        assert self._proc is not None
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self._proc.pid)
            found[root.pid] = root
            for p in root.children(recursive=True):
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        # Orphans whose parent died were reparented away from the tree (to us, the
        # subreaper): their session, or the token in their environment, finds them.
        sid = self._proc.pid
        for p in psutil.process_iter():
            if p.pid in found or p.pid == os.getpid():
                continue
            try:
                if os.getsid(p.pid) == sid or p.environ().get(TRAINER_TOKEN_ENV) == self.token:
                    found[p.pid] = p
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return list(found.values())

    def kill_leftovers(self) -> int:
        """After the main process ended: SIGKILL and reap whatever of its tree is left
        (data-loader workers, torchrun's ranks, a shell's children), so a restart never
        runs beside them. How many there were."""
        if self._proc is None:
            return 0
        victims = [p for p in self._tree() if p.pid != self._proc.pid]
        if not victims:
            return 0
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.kill()
        _gone, alive = psutil.wait_procs(victims, timeout=10.0)
        log.warning(
            "child_leftovers_killed",
            pid=self._proc.pid,
            killed=[p.pid for p in victims],
            still_alive=[p.pid for p in alive],
        )
        return len(victims)

    def kill_tree(self, why: str) -> ExitStatus | None:
        """SIGKILL the whole tree, then reap the main process and any adopted descendants."""
        if self._proc is None:
            return None
        victims = self._tree()
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.kill()
        log.warning("child_tree_killed", pid=self._proc.pid, why=why, killed=len(victims))
        status = self.wait(timeout=10.0)
        psutil.wait_procs([p for p in victims if p.pid != self._proc.pid], timeout=5.0)
        return status
