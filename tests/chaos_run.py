"""The chaos run: one training run, many injected faults, nothing lost.

One real training run (the reference trainer on CPU, under real ``spot-supervisor run``
processes, against moto's S3 server through the fault-injecting proxy and the metadata
emulator, all on loopback) suffers a seeded schedule of events at random times:

* ``notice``: a spot notice with a deadline 10-120 s away; the supervisor must commit
  and exit 0; the harness then boots a new one, on a new instance (empty local dir) or
  on the same one;
* ``kill_trainer_mid_save``: SIGKILL of the trainer while its ``.tmp-step-*`` dir exists;
  the supervisor restarts it;
* ``kill_supervisor_mid_upload`` / ``kill_supervisor_mid_commit``: SIGKILL of the
  supervisor (and, as systemd's cgroup kill would, of its trainer) while the proxy
  holds a PUT of a data object (throttled) or of a ``manifest.json`` (stalled) in
  flight; the harness restarts it on the same instance, as ``Restart=on-failure`` would;
* ``rebalance``: a rebalance recommendation (an early checkpoint, training goes on);
* ``s3_*``: a proxy fault: a 503 SlowDown burst, 500s, connection resets, stalls, a
  request body corrupted in flight.

After every event an invariant checker reads the bucket directly (its own boto3 client,
not the proxy, not the daemon's code): every manifest's files exist with their size and
sha256; the newest committed step never goes down; retention never deletes one of the
newest ``keep_remote`` committed checkpoints (and leaves exactly that many at the end);
the daemon's own listing returns exactly the committed steps, never a step prefix
without a valid manifest; and now and then the daemon's restore, run into a scratch
dir, installs the newest committed checkpoint, byte for byte. At the end the run's
``final_params_sha256`` must equal that of an uninterrupted run with the same flags.

    python tests/chaos_run.py [--events N] [--seed S] [--short] [--out FILE]

Exit status 0 when every invariant held, the hashes are equal and all the events were
applied; 1 otherwise (the JSON report says why).

This module runs the parts in order (:class:`Chaos`) and holds the command line; the
parts are its sibling modules: ``chaos_schedule`` (the settings and the seeded
schedule), ``chaos_harness`` (the supervisors and trainers), ``chaos_events`` (the
faults), ``chaos_checker`` (the invariants) and ``chaos_report`` (the report).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The run's parts, one job each (sibling modules: this directory is on sys.path):
from chaos_checker import Checker, InvariantViolation  # noqa: E402
from chaos_events import Events  # noqa: E402
from chaos_harness import lines_of, wait_until  # noqa: E402
from chaos_report import brief, build_report, params_hash, summary  # noqa: E402
from chaos_schedule import BUCKET, FULL, KINDS, SHORT, Planned, Settings, schedule  # noqa: E402

from daemon.standins import LocalS3, start_local_s3  # noqa: E402
from daemon.standins.demo import trainer_command  # noqa: E402
from daemon.standins.emulator import MetadataEmulator  # noqa: E402
from daemon.standins.faultproxy import FaultProxy  # noqa: E402

# Importable from here, as test_chaos.py does.
__all__ = ["FULL", "KINDS", "SHORT", "Chaos", "Settings", "main"]


class Chaos(Events):
    """One chaos run; :meth:`run` returns the report (also written as JSON)."""

    def run(self) -> dict[str, Any]:
        s = self.s
        self.work.mkdir(parents=True, exist_ok=True)
        self.say(
            f"chaos run: seed {s.seed}, {s.events} events, trainer {' '.join(self.flags)}, "
            f"work dir {self.work}"
        )
        ref_dir = self.work / "reference"
        ref_out = (self.work / "reference.out").open("w")
        reference = subprocess.Popen(
            [
                *trainer_command(s.steps, s.save_every, s.step_seconds, s.state_mb),
                "--checkpoint-dir",
                str(ref_dir),
            ],
            stdout=ref_out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.s3: LocalS3 = start_local_s3()
        self.proxy = FaultProxy(self.s3.endpoint_url, seed=s.seed).start()
        self.emulator = MetadataEmulator().start()
        report: dict[str, Any] = {}
        violation: str | None = None
        checker = Checker(self.s3.endpoint_url, s.keep_remote, self.work / "scratch")
        try:
            checker.s3.create_bucket(Bucket=BUCKET)
            self.boot(new_instance=True)
            try:
                self._events(checker)
                self._finish(checker)
            except (InvariantViolation, AssertionError) as exc:
                violation = str(exc)
                self.say(f"VIOLATION: {violation}")
            # The uninterrupted run, with the same flags.
            try:
                reference.wait(timeout=max(60.0, s.steps * s.step_seconds * 4))
            except subprocess.TimeoutExpired:
                reference.kill()
                reference.wait()
            ref_out.close()
            ref_hash = params_hash((self.work / "reference.out").read_text().splitlines())
            final_hash = None
            for sup in reversed(self.sups):
                final_hash = params_hash(lines_of(sup))
                if final_hash:
                    break
            report = build_report(self, checker, final_hash, ref_hash, violation)
        finally:
            self._cleanup(reference)
        return report

    def _events(self, checker: Checker) -> None:
        s = self.s
        deadline = self.t0 + s.max_seconds
        stream = schedule(s.seed)
        handlers: dict[str, Callable[[Planned], dict[str, Any] | None]] = {
            k: getattr(self, f"ev_{k}") for k in KINDS
        }
        tried = 0
        while sum(self.applied.values()) < s.events and tried < 3 * s.events:
            if time.monotonic() > deadline:
                raise InvariantViolation(f"the run took more than {s.max_seconds:.0f} s")
            p = next(stream)
            tried += 1
            # Every kind but the S3 faults acts on a trainer that is running.
            if not wait_until(lambda: self.progressing() or self.exited(), 120, 0.05):
                raise InvariantViolation("the trainer never got going after a boot")
            if self.finished:
                break
            if not self.progressing():
                continue  # a supervisor was restarted meanwhile: draw again once it runs
            # Pause: drawn from the seed, shortened when the steps left run short of events.
            lo, hi = s.gap
            gap = lo + p.gap_s * (hi - lo)
            left_events = s.events - sum(self.applied.values())
            if s.steps - self.current_step() < 12 * left_events:
                gap = 0.05
            time.sleep(gap)
            if self.exited():
                if self.finished:
                    break
                continue
            t = time.monotonic() - self.t0
            rec = handlers[p.kind](p)
            if rec is None:
                self.skipped[p.kind] += 1
                self.say(f"#{p.index:03d} {p.kind}: no window, skipped")
                continue
            self.applied[p.kind] += 1
            n = sum(self.applied.values())
            checked = checker.check(f"after event {n} ({p.kind})")
            restored = None
            if n % s.restore_check_every == 0:
                restored = checker.check_restore(f"after event {n} ({p.kind})")
            self.records.append(
                {"n": n, "kind": p.kind, "t": round(t, 2), **rec, "newest": checked.newest}
            )
            extra = f", restore check: step {restored}" if restored is not None else ""
            self.say(
                f"event {n:3d} {p.kind}: {brief(rec)}; committed {sorted(checked.committed)}{extra}"
            )

    def _finish(self, checker: Checker) -> None:
        """No more faults: let training complete, then the end-of-run checks."""
        self.clear_s3_faults()
        self.proxy.clear()
        self.emulator.clear_notice()
        self.emulator.clear_rebalance()
        left = self.s.steps * (self.s.step_seconds + 0.1) + 300
        end = time.monotonic() + left
        while not self.finished:
            if time.monotonic() > end:
                raise InvariantViolation("the run did not complete after the last event")
            if not self.exited():
                time.sleep(0.2)
        self.say(f"run completed at step {self.sup.find('run_completed')[0]['step']}")
        checker.check("at the end", final=True)
        checker.check_restore("at the end")
        # One more boot: complete.json stops it before any training.
        self.boot(new_instance=True)
        code = self.sup.wait_exit(60)
        if code != 0 or not self.sup.find("run_already_complete") or self.sup.find("child_started"):
            raise InvariantViolation(f"a boot after completion exited {code} or trained again")

    def _cleanup(self, reference: subprocess.Popen[bytes]) -> None:
        for i, sup in enumerate(self.sups, 1):
            if sup.proc is not None and sup.proc.poll() is None:
                sup.proc.kill()
                sup.proc.wait(timeout=10)
            # The evidence: every boot's events and trainer lines.
            (self.work / f"boot-{i:03d}.log").write_text("\n".join(lines_of(sup)) + "\n")
        for pid in self.trainer_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if reference.poll() is None:
            reference.kill()
            reference.wait(timeout=10)
        self.emulator.stop()
        self.proxy.stop()
        self.s3.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The chaos run (see the module docstring).")
    ap.add_argument("--short", action="store_true", help="the suite's short version")
    ap.add_argument("--events", type=int, help="events to inject")
    ap.add_argument("--seed", type=int, help="seed of the schedule")
    ap.add_argument("--steps", type=int, help="trainer --steps")
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--echo", action="store_true", help="print the supervisors' output")
    args = ap.parse_args(argv)
    base = SHORT if args.short else FULL
    settings = Settings(
        **{
            **asdict(base),
            **{k: v for k, v in (("events", args.events), ("seed", args.seed)) if v is not None},
            **({"steps": args.steps} if args.steps is not None else {}),
        }
    )
    from daemon import log

    log.configure(level="warning", stream=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="spot-chaos-"))
    report: dict[str, Any] = {"ok": False}
    try:
        report = Chaos(settings, work, echo=args.echo).run()
    finally:
        if args.keep or not report["ok"]:
            print(f"work dir kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(report), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
