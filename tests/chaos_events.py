"""The chaos run's events: each kind of fault, injected into the running harness (no tests).

A spot notice (the supervisor must commit and exit 0; a new boot follows), SIGKILL of
the trainer mid-save, SIGKILL of the supervisor (and its trainer) mid-upload or
mid-commit, a rebalance recommendation, and the S3 faults of the proxy. Each ``ev_*``
returns the event's record, or None when no window came for it. What must not live
here: when events come (chaos_schedule.py, chaos_run.py), or what is checked after.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import signal
import time
from typing import Any

from chaos_checker import InvariantViolation
from chaos_harness import Harness, alive, wait_until
from chaos_schedule import Planned

from daemon.standins.faultproxy import Rule

MiB = 1024 * 1024

# Requests of the run's checkpoints (PUT, GET, list, delete: the prefix is in the target).
CKPT_RE = r"checkpoints"
# A PUT of the large data file of a checkpoint (the ballast), and of a manifest.
DATA_PUT_RE = r"/step-\d{9}/ballast\.pt"
MANIFEST_PUT_RE = r"/step-\d{9}/manifest\.json"
# A trainer's own temporary checkpoint dir: .tmp-step-<9 digits>-<writer pid>-...
WRITER_TMP_RE = re.compile(r"^\.tmp-step-\d{9}-(\d+)-")


class Events(Harness):
    """The events of the schedule, one ``ev_<kind>`` method per kind."""

    def ev_notice(self, p: Planned) -> dict[str, Any]:
        lead = int(p.params["deadline_s"])
        sup = self.sup
        at = self.emulator.set_notice(
            "terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=lead)
        )
        code = sup.wait_exit(lead + 90)
        self.emulator.clear_notice()
        pid = self.trainer_pid(sup)
        if pid is not None:
            raise InvariantViolation(f"trainer {pid} still running after the supervisor exited")
        if code != 0:
            raise InvariantViolation(f"supervisor exited {code} after a notice, not 0")
        done = sup.find("emergency_committed")
        fields = (done or sup.find("emergency_not_committed") or [{}])[0]
        outcome = "committed" if done else "not_committed"
        if sup.find("run_completed"):
            self.finished = True
            outcome = "run_completed_first"
        self.outcomes[f"notice_{outcome}"] += 1
        if not self.finished:
            self.boot(bool(p.params["new_instance"]))
        return {
            "deadline_s": lead,
            "notice_time": at.isoformat(),
            "outcome": outcome,
            "committed_step": fields.get("committed_step"),
            "seconds_before_deadline": fields.get("seconds_before_deadline"),
            "new_instance": bool(p.params["new_instance"]),
        }

    def ev_kill_trainer_mid_save(self, p: Planned) -> dict[str, Any] | None:
        pid = self.trainer_pid()
        if pid is None:
            return None
        local = self.local_dir
        found: str | None = None
        end = time.monotonic() + 30
        while found is None and time.monotonic() < end and alive(pid):
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(local):
                    m = WRITER_TMP_RE.match(name)
                    if m and int(m.group(1)) == pid:
                        found = name
                        break
            if found is None:
                time.sleep(0.002)
        if found is None:
            return None
        os.kill(pid, signal.SIGKILL)
        if not wait_until(lambda: not alive(pid), 10):
            raise InvariantViolation(f"trainer {pid} survived SIGKILL")
        mid_save = (local / found).exists()
        self.outcomes["trainer_killed_mid_save" if mid_save else "trainer_save_won_race"] += 1
        restarted = wait_until(lambda: self.trainer_pid() not in (None, pid), 30, 0.05)
        if not restarted and not self.exited():
            raise InvariantViolation(f"the supervisor did not restart the trainer killed ({pid})")
        return {"pid": pid, "tmp_dir": found, "mid_save": mid_save, "restarted": restarted}

    def _kill_supervisor_during(self, rule: Rule, what: str) -> dict[str, Any] | None:
        armed = time.monotonic()
        sup = self.sup
        proc = sup.proc
        assert proc is not None
        fired = wait_until(lambda: rule.applied > 0 or proc.poll() is not None, 45, 0.005)
        if not fired or rule.applied == 0:
            self.proxy.remove(rule)
            return None
        time.sleep(0.05)  # well inside the throttled body or the stall
        kind = rule.kind.value
        done = [r for r in self.proxy.records(settle=0) if r.started >= armed and kind in r.faults]
        if done:  # it finished before we could act: no window
            self.proxy.remove(rule)
            return None
        pid = self.trainer_pid(sup)
        proc.kill()
        self.kill_trainer_group(pid)
        code = sup.wait_exit(10)
        self.proxy.remove(rule)
        self.proxy.wait_idle(10)
        hit = [r for r in self.proxy.records(settle=0) if r.started >= armed and kind in r.faults]
        # A throttled body still in the socket buffers may outlive the client for a while.
        target = hit[0].target if hit else f"PUT {rule.path} (still being relayed)"
        self.outcomes[f"supervisor_killed_mid_{what}"] += 1
        time.sleep(0.5)  # systemd's RestartSec, shortened
        self.boot(new_instance=False)
        return {"request": target, "supervisor_code": code, "trainer_pid": pid}

    def ev_kill_supervisor_mid_upload(self, p: Planned) -> dict[str, Any] | None:
        # 256 KiB/s: the ballast takes seconds to go up; the kill comes within 0.1 s.
        rule = self.proxy.throttle(256 * 1024, "request", method="PUT", path=DATA_PUT_RE, count=1)
        return self._kill_supervisor_during(rule, "upload")

    def ev_kill_supervisor_mid_commit(self, p: Planned) -> dict[str, Any] | None:
        # The manifest reaches the server; its answer is held: the commit is in flight.
        rule = self.proxy.stall(5.0, method="PUT", path=MANIFEST_PUT_RE, count=1)
        return self._kill_supervisor_during(rule, "commit")

    def ev_rebalance(self, p: Planned) -> dict[str, Any] | None:
        before = len(self.sup.find("early_checkpoint_requested"))
        self.emulator.set_rebalance()
        try:
            ok = wait_until(
                lambda: len(self.sup.find("early_checkpoint_requested")) > before, 20, 0.05
            )
        finally:
            self.emulator.clear_rebalance()
        self.outcomes["rebalance_acted_on" if ok else "rebalance_not_seen"] += 1
        return {"early_checkpoint_requested": ok}

    def _arm(self, rule: Rule) -> dict[str, Any]:
        self.s3_rules.append(rule)
        fired = wait_until(lambda: rule.applied > 0, 20, 0.02)
        self.outcomes["s3_fault_fired" if fired else "s3_fault_not_fired"] += 1
        return {"rule": {k: v for k, v in rule.to_dict().items() if v not in (None, 0)}}

    def ev_s3_503_burst(self, p: Planned) -> dict[str, Any]:
        self.clear_s3_faults()
        return self._arm(self.proxy.error(503, "SlowDown", path=CKPT_RE, count=p.params["count"]))

    def ev_s3_500(self, p: Planned) -> dict[str, Any]:
        self.clear_s3_faults()
        return self._arm(
            self.proxy.error(500, "InternalError", path=CKPT_RE, count=p.params["count"])
        )

    def ev_s3_reset(self, p: Planned) -> dict[str, Any]:
        self.clear_s3_faults()
        rule = self.proxy.reset(
            p.params["phase"], p.params["after_bytes"], path=CKPT_RE, count=p.params["count"]
        )
        return self._arm(rule)

    def ev_s3_stall(self, p: Planned) -> dict[str, Any]:
        self.clear_s3_faults()
        rule = self.proxy.stall(p.params["seconds"], path=CKPT_RE, count=p.params["count"])
        return self._arm(rule)

    def ev_s3_corrupt(self, p: Planned) -> dict[str, Any]:
        self.clear_s3_faults()
        size = self.s.state_mb * MiB
        offset = int(p.params["fraction"] * max(size - 64, 1))
        rule = self.proxy.corrupt(
            "request", offset, p.params["nbytes"], method="PUT", path=DATA_PUT_RE, count=1
        )
        return self._arm(rule)

    # -- the whole run -----------------------------------------------------------------
