"""The benchmark harness and the cost model (numbers are measured by `make bench`, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import render
from bench.common import Row
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
    rows = [
        {
            "group": "detection",
            "name": "notice -> SIGTERM p50, ours at its default 1 s",
            "ours": 0.4,
        },
        {
            "group": "detection",
            "name": "notice -> SIGTERM p50, both polling every 5 s",
            "ours": 2.6,
            "baseline": 3.0,
        },
    ]
    md = cost_markdown(rows)
    assert "detection p50: ours 0.40 s at 1 s polling, seed 3.00 s" in md
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


def test_quick_transfer_emergency_and_projection_rows(tmp_path: Path) -> None:
    """The S3 benchmarks, small, on moto behind the shaping proxy: every row says its
    server and baseline, and carries what the README reads. No timing is asserted."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "transfer",
            "emergency",
            "projection",
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "SPOT_BENCH_SERVERS": "moto"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["meta"]["failed"] == []
    rows = {(row["group"], row["name"]): row for row in doc["rows"]}
    for kind in ("upload", "restore"):
        for shape in ("large files", "64 KB files"):
            row = rows[("transfer", f"{kind} {shape}")]
            assert row["baseline_name"].startswith("boto3") and row["target"] == ">= 1.0"
            assert set(row["extra"]["mb_per_s"]) == {"ours", "boto3"}
            assert set(row["extra"]["server_busy"]) == {"ours", "boto3"}
            # Each row names where the server ran (bench.placement): its own CPUs here.
            assert "server and proxy on CPU 1, instance on CPU 0" in row["server"]
    (emergency,) = [row for (g, _), row in rows.items() if g == "emergency"]
    assert emergency["baseline_name"].startswith("max(write alone, upload alone)")
    extra = emergency["extra"]
    assert set(extra["median_seconds"]) == {"write", "upload", "pipelined"}
    assert set(extra["server_busy"]) == {"write", "upload", "pipelined"}
    assert extra["server_busy"]["write"] < extra["server_busy"]["upload"]
    assert extra["instance_cpus"] == 1 and extra["instance_floor_s"] > 0
    # One repeat (--quick): its own pair is the ratio of the medians.
    (paired,) = extra["paired_ratios"]
    assert paired == extra["median_paired_ratio"] == round(emergency["ratio"], 3)
    # What new page cache cost the VM before and after the row: a slow day is seen.
    assert set(extra["page_cache_sys_s_per_gb"]) == {"before", "after"}
    assert all(v >= 0 for v in extra["page_cache_sys_s_per_gb"].values())
    (pipelined,) = extra["pipelined"]
    # The ballast was followed as it was written: its parts went up before its rename.
    assert pipelined["files_followed"] >= 1 and pipelined["sent_while_writing"] > 0
    # Each way says whether a complete's answer came late and what the server sent back:
    # nothing is read back when every answer arrived (a 64 MiB complete is quick).
    (alone,) = extra["upload_alone"]
    for way in (pipelined, alone):
        assert way["completed_on_retry"] == way["read_back"] == 0
        assert 0 <= way["bytes_served"] < 1_000_000
    (projection,) = [row for (g, _), row in rows.items() if g == "projection"]
    assert projection["extra"]["connections_for_100_s"] >= 1
    for row in doc["rows"]:
        assert row["server"].startswith(("moto, shaped", "projection from one connection"))
        assert row["ratio"] == row["ours"] / row["baseline"]
    md = (tmp_path / "results.md").read_text()
    assert "| benchmark | server |" in md


def _doc(when: str, platform: str, groups: list[str]) -> dict[str, object]:
    rows = [
        Row(g, f"{g} row", "s", 1.0, 2.0, "a baseline", "1 file", 1, target="<= 1").to_dict()
        for g in groups
    ]
    machine = {"host": "vm", "cpu_count": 2, "platform": platform, "python": "3.11"}
    return {"meta": {"when": when, "machine": machine, "quick": False, "failed": []}, "rows": rows}


def test_merged_runs_name_their_groups_and_a_different_vm_build() -> None:
    """A later run replaces an earlier one's groups; each run's line says which groups it
    still supplies, and where it ran when that is not the header's VM build."""
    first = _doc("T1", "linux-a", ["transfer", "emergency"])
    second = _doc("T2", "linux-b", ["emergency"])
    doc = render.merge([first, second])
    assert [r["group"] for r in doc["rows"]] == ["transfer", "emergency"]
    assert doc["meta"]["runs"] == [
        {"when": "T1", "platform": "linux-a", "groups": ["transfer"]},
        {"when": "T2", "platform": "linux-b", "groups": ["emergency"]},
    ]
    md = render.markdown(doc)
    assert md.startswith("Measured T2 on linux-b, 2 CPUs")
    assert "\ntransfer: run of T1 on linux-a.\n" in md
    assert "\nemergency: run of T2.\n" in md


def test_readme_table_is_the_render_of_the_kept_results() -> None:
    """The README's benchmark table is never typed by hand: it is `python -m bench.render`
    of docs/bench-results.json, word for word."""
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- bench-table -->\n", "<!-- /bench-table -->"
    table = readme[readme.index(start) + len(start) : readme.index(end)]
    kept = json.loads(render.DEFAULT.read_text())
    assert table == render.markdown(render.merge([kept]))
