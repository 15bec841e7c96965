"""The benchmark harness and the cost model (numbers are measured by `make bench`, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.cost import Assumptions, cost_markdown, lost_per_interruption_min, outcome

REPO = Path(__file__).resolve().parent.parent


def test_cost_model_ours_loses_only_the_step_in_progress() -> None:
    a = Assumptions()
    assert lost_per_interruption_min(a, ours=True) < 0.1
    assert (
        lost_per_interruption_min(a, ours=False) == a.periodic_minutes / 2 + a.cron_sync_minutes / 2
    )
    for k in (1, 5):
        assert outcome(a, k, ours=True).cost < outcome(a, k, ours=False).cost
    assert outcome(a, 0, ours=True).cost == outcome(a, 0, ours=False).cost


def test_cost_model_when_the_checkpoint_cannot_fit_in_the_notice() -> None:
    huge = Assumptions(checkpoint_gb=1000.0)
    assert lost_per_interruption_min(huge, ours=True) == huge.periodic_minutes / 2


def test_cost_table_uses_measured_rows() -> None:
    rows = [{"group": "detection", "name": "notice -> SIGTERM p50", "ours": 0.4, "baseline": 3.0}]
    md = cost_markdown(rows)
    assert "detection p50: ours 0.40 s" in md
    assert "| 10 | spot-supervisor |" in md


def test_harness_writes_json_and_markdown(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bench", "footprint", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    names = {row["name"] for row in doc["rows"]}
    assert names == {"daemon RSS", "daemon CPU"}
    for row in doc["rows"]:
        assert row["baseline"] and row["ratio"] == row["ours"] / row["baseline"]
    md = (tmp_path / "results.md").read_text()
    assert "| footprint: daemon RSS |" in md and "### Cost model" in md
