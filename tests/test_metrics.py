"""The Prometheus textfile: valid exposition text, atomic rewrite, nothing when disabled."""

from __future__ import annotations

import re
from pathlib import Path

from structlog.testing import capture_logs

from daemon.metrics import Metrics, TextfileWriter, render

SAMPLE = re.compile(r'^([a-z_]+)\{([a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*)\} (\S+)$')


def parse(text: str) -> dict[str, float]:
    samples = {}
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
            continue
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        assert m.group(1) in types, f"{m.group(1)} has no TYPE line"
        samples[f"{m.group(1)}{{{m.group(2)}}}"] = float(m.group(4))
    return samples


def test_render_counts_and_ages() -> None:
    m = Metrics(
        run_id="r1",
        notices={"terminate": 2, "shutdown": 1},
        checkpoints_committed=7,
        bytes_uploaded=10_000,
        upload_seconds=1.5,
        newest_committed_step=700,
        newest_committed_at=1000.0,
        trainer_restarts=1,
        metadata_failures=4,
        phase="training",
    )
    s = parse(render(m, now=1030.0))
    assert s['spot_supervisor_notices_total{run_id="r1",action="terminate"}'] == 2
    assert s['spot_supervisor_notices_total{run_id="r1",action="shutdown"}'] == 1
    assert s['spot_supervisor_checkpoints_committed_total{run_id="r1"}'] == 7
    assert s['spot_supervisor_uploaded_bytes_total{run_id="r1"}'] == 10_000
    assert s['spot_supervisor_upload_seconds_total{run_id="r1"}'] == 1.5
    assert s['spot_supervisor_newest_committed_age_seconds{run_id="r1"}'] == 30
    assert s['spot_supervisor_trainer_restarts_total{run_id="r1"}'] == 1
    assert s['spot_supervisor_phase{run_id="r1",phase="training"}'] == 1
    assert s['spot_supervisor_phase{run_id="r1",phase="draining"}'] == 0


def test_no_committed_checkpoint_means_no_age_series() -> None:
    text = render(Metrics(run_id="r"), now=5.0)
    assert "newest_committed_age_seconds" not in text
    assert 'notices_total{run_id="r",action="terminate"} 0' in text


def test_writer_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "textfile" / "spot.prom"
    m = Metrics(run_id="r")
    w = TextfileWriter(path, m)
    assert w.write()
    m.checkpoints_committed = 3
    assert w.write()
    assert 'checkpoints_committed_total{run_id="r"} 3' in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["spot.prom"]  # no stray temp files


def test_writer_disabled_or_unwritable_does_not_raise(tmp_path: Path) -> None:
    assert TextfileWriter(None, Metrics(run_id="r")).write() is False
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert TextfileWriter(blocker / "sub" / "m.prom", Metrics(run_id="r")).write() is False


def test_write_failure_is_logged_once_until_it_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "textfile"
    blocker.write_text("a file where the dir should be")
    path = blocker / "spot.prom"
    w = TextfileWriter(path, Metrics(run_id="r"))
    with capture_logs() as logs:
        assert w.write() is False
        assert w.write() is False  # still failing: no second warning
        blocker.unlink()
        assert w.write() is True  # recovered
        assert w.write() is True
        path.unlink()
        path.parent.rmdir()
        blocker.write_text("broken again")
        assert w.write() is False  # failed again: warned again
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [
        ("metrics_textfile_unwritable", "warning"),
        ("metrics_textfile_writable_again", "info"),
        ("metrics_textfile_unwritable", "warning"),
    ]
    first = logs[0]
    assert first["path"] == str(path) and "Not a directory" in first["error"]
