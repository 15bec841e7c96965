"""The chaos run's report: the JSON record of a run, and its summary for a human (no tests).

What the report counts from the supervisors' and trainers' lines (steps retrained,
steps executed, trainer starts), the final parameters' hash, and whether the run was ok.
What must not live here: the run, or the checks themselves (chaos_checker.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from chaos_checker import Checker
from chaos_harness import RESUMED_RE, STEP_LINE_RE, Harness, lines_of


def build_report(
    run: Harness,
    checker: Checker,
    final_hash: str | None,
    ref_hash: str | None,
    violation: str | None,
) -> dict[str, Any]:
    """The JSON report of a finished run (``violation``: why it stopped early, if it did)."""
    lost, executed, starts = lost_steps([ln for sup in run.sups for ln in lines_of(sup)])
    commits = sum(len(sup.find("checkpoint_committed")) for sup in run.sups)
    applied = sum(run.applied.values())
    ok = (
        violation is None
        and final_hash is not None
        and final_hash == ref_hash
        and applied >= run.s.events
    )
    why = violation
    if why is None and final_hash != ref_hash:
        why = f"final_params_sha256 {final_hash} != uninterrupted {ref_hash}"
    if why is None and applied < run.s.events:
        why = f"only {applied} of {run.s.events} events applied before the run completed"
    return {
        "ok": ok,
        "failure": why,
        "settings": asdict(run.s),
        "trainer_flags": run.flags,
        "events_applied": applied,
        "events_by_kind": dict(sorted(run.applied.items())),
        "events_skipped_no_window": dict(sorted(run.skipped.items())),
        "outcomes": dict(sorted(run.outcomes.items())),
        "commits": commits,
        "emergency_commits": sum(len(sup.find("emergency_committed")) for sup in run.sups),
        "committed_steps_seen": len(checker.seen),
        "lost_steps": lost,
        "steps_executed": executed,
        "trainer_starts": starts,
        "supervisor_boots": run.boots,
        "instances": run.new_instances,
        "unexpected_supervisor_exits": run.unexpected_exits,
        "invariant_checks": checker.checks,
        "restore_checks": checker.restore_checks,
        "max_committed_at_once": checker.max_committed,
        "over_retention_count": checker.over_count,
        "final_params_sha256": final_hash,
        "uninterrupted_params_sha256": ref_hash,
        "hash_equal": final_hash is not None and final_hash == ref_hash,
        "wall_seconds": round(time.monotonic() - run.t0, 1),
        "events": run.records,
    }


def params_hash(lines: list[str]) -> str | None:
    """The ``final_params_sha256`` a trainer printed, if it did."""
    for ln in lines:
        if ln.startswith("final_params_sha256="):
            return ln.split("=", 1)[1].strip()
    return None


def lost_steps(lines: list[str]) -> tuple[int, int, int]:
    """(steps retrained, steps executed, trainer starts) from the trainers' output, in order.

    Lost steps: over every start of the trainer, the step its predecessor reached minus
    the step it resumed from."""
    lost = executed = starts = 0
    last = 0
    for ln in lines:
        m = STEP_LINE_RE.match(ln)
        if m:
            last = int(m.group(1))
            executed += 1
            continue
        m = RESUMED_RE.match(ln)
        if m or ln.startswith("start step=0"):
            resumed = int(m.group(1)) if m else 0
            lost += max(0, last - resumed)
            last = resumed
            starts += 1
    return lost, executed, starts


def brief(rec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("rule",)) or str(
        rec.get("rule")
    )


def summary(report: dict[str, Any]) -> str:
    """The counts, for a human."""
    kinds = ", ".join(f"{k} {v}" for k, v in report["events_by_kind"].items())
    return "\n".join(
        [
            f"events: {report['events_applied']} ({kinds})",
            f"skipped for want of a window: {report['events_skipped_no_window']}",
            f"outcomes: {report['outcomes']}",
            f"commits: {report['commits']} (emergency {report['emergency_commits']}), "
            f"committed steps seen: {report['committed_steps_seen']}",
            f"lost steps: {report['lost_steps']} (steps executed {report['steps_executed']} "
            f"for {report['settings']['steps']}), trainer starts: {report['trainer_starts']}, "
            f"supervisor boots: {report['supervisor_boots']} on {report['instances']} instances",
            f"invariant checks: {report['invariant_checks']}, restore checks: "
            f"{report['restore_checks']}, most committed at once: "
            f"{report['max_committed_at_once']}",
            f"final_params_sha256: {report['final_params_sha256']}",
            f"uninterrupted:       {report['uninterrupted_params_sha256']}  "
            f"equal: {report['hash_equal']}",
            f"wall time: {report['wall_seconds']} s",
            "RESULT: " + ("ok" if report["ok"] else f"FAILED: {report['failure']}"),
        ]
    )
