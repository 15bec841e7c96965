"""A torch-free stand-in for a trainer, for supervisor tests that are about processes,
not about models: it writes real checkpoints (daemon.layout) and obeys CONTRACT §3.

    scripted_trainer.py STEPS [--crash-at N] [--hang-at N] [--ignore-sigterm] [--step-seconds S]
        [--state-kb K] [--leave-helpers FILE] [--no-final]

It resumes from the newest complete checkpoint in $SPOT_CHECKPOINT_DIR, saves every
step, and exits 0 after STEPS. ``--crash-at N`` exits 3 when it reaches step N in the
first attempt (a marker file makes the crash happen once); ``--hang-at N`` stops making
progress there instead, once, deaf to SIGTERM (a collective that never returns).
``--state-kb K`` makes each checkpoint K KiB. ``--leave-helpers FILE`` starts two helper
processes (one in the trainer's session, one in a session of its own, as torchrun's
workers are) and writes their pids to FILE, once. ``--no-final`` names the last save
``periodic``: a command that ends without honouring the ``final`` reason.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon import layout

stop = False
requested = False


def on_term(_signum: int, _frame: object) -> None:
    global stop
    stop = True


def on_usr1(_signum: int, _frame: object) -> None:
    global requested
    requested = True


STATE_KB = 9


def save(d: Path, step: int, reason: str) -> None:
    with layout.CheckpointWriter(d, os.environ["SPOT_RUN_ID"], step, reason) as w:
        w.add_bytes("weights.bin", ((b"%09d" % step) * 114)[:1024] * STATE_KB)
        w.commit()
    print(f"checkpoint_saved step={step} reason={reason}", flush=True)


def leave_helpers(pid_file: Path) -> None:
    """Two processes that outlive a SIGKILLed trainer unless the supervisor kills them."""
    if pid_file.exists():
        return
    sleeper = "import time; time.sleep(600)"
    own_session = "import os, time; os.setsid(); time.sleep(600)"
    pids = [subprocess.Popen([sys.executable, "-c", code]).pid for code in (sleeper, own_session)]
    pid_file.write_text(" ".join(map(str, pids)))
    print(f"helpers_started pids={','.join(map(str, pids))}", flush=True)


def main() -> int:
    global requested
    p = argparse.ArgumentParser()
    p.add_argument("steps", type=int)
    p.add_argument("--crash-at", type=int)
    p.add_argument("--hang-at", type=int)
    p.add_argument("--always-crash", action="store_true")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--step-seconds", type=float, default=0.05)
    p.add_argument("--save-every", type=int, default=1)
    p.add_argument("--state-kb", type=int, default=9)
    p.add_argument("--leave-helpers", type=Path)
    p.add_argument("--no-final", action="store_true")
    a = p.parse_args()
    global STATE_KB
    STATE_KB = a.state_kb
    if a.leave_helpers is not None:
        leave_helpers(a.leave_helpers)
    d = Path(os.environ["SPOT_CHECKPOINT_DIR"])
    signal.signal(signal.SIGTERM, signal.SIG_IGN if a.ignore_sigterm else on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    step = 0
    for s, path in layout.list_step_dirs(d):
        try:
            layout.load_complete(path)
        except layout.ManifestError:
            continue
        step = s
        break
    print(f"resumed step={step}", flush=True)
    if a.always_crash:
        save(d, step + 1, "periodic")
        return 3
    while step < a.steps:
        time.sleep(a.step_seconds)
        step += 1
        marker = d.parent / "crashed-once"
        if a.crash_at == step and not marker.exists():
            marker.write_text("x")
            print(f"crashing at step={step}", flush=True)
            return 3
        if a.hang_at == step and not marker.exists():
            marker.write_text("x")
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print(f"hanging at step={step}", flush=True)
            while True:
                time.sleep(3600)
        if stop:
            save(d, step, "interrupt")
            return 0
        if requested:
            requested = False
            save(d, step, "requested")
        elif step == a.steps or step % a.save_every == 0:
            final = step == a.steps and not a.no_final
            save(d, step, "final" if final else "periodic")
    print("final_params_sha256=" + "0" * 64, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
