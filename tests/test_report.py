"""``spot-supervisor report`` (daemon/report/): figures from a ledger with known numbers,
and the files a reader opens.

The ledger is written by the daemon's own writer (daemon/ledger.py) to moto's S3 server
over HTTP, with a clock the test sets, so every figure has a value worked out by hand
below. The page is opened in headless Chromium (tests/chromium.py), which must be
installed: a missing browser fails the test, it does not skip it. Other runs (an
emergency commit, a standby handoff, a boot gone without a notice) are in
tests/test_report_scenarios.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chromium import INSTALL_HINT, find_chromium, load_page

from daemon.ledger import InstanceFacts, RunLedger, read_ledger
from daemon.report import figures as report_figures
from daemon.report.cli import main as report_main
from daemon.report.figures import Committed, Pricing, compute
from daemon.standins import LocalS3
from daemon.storage.s3client import RemoteLocation, make_s3_client
from daemon.storage.store import CheckpointStore

RUN = "report-run"
PREFIX = "runs"
DAY = "2026-12-01"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def at(hms: str) -> dt.datetime:
    return dt.datetime.fromisoformat(f"{DAY}T{hms}+00:00")


def iso(hms: str) -> str:
    return f"{DAY}T{hms}Z"


class SetClock:
    """The ledger's clock: whatever time the scenario says it is."""

    def __init__(self) -> None:
        self.now = at("00:00:00")

    def __call__(self) -> dt.datetime:
        return self.now

    def set(self, hms: str) -> SetClock:
        self.now = at(hms)
        return self


def make_store(endpoint: str, bucket: str) -> CheckpointStore:
    client = make_s3_client(endpoint, "us-east-1", max_attempts=2)
    return CheckpointStore(client, RemoteLocation(bucket, PREFIX), RUN)


def write_known_run(store: CheckpointStore) -> None:
    """Three boots, one spot notice, known commits (times UTC on 2026-12-01):

    A  i-a  g5.xlarge   spot 0.40/h (ledger)  up since 09:59:00 (uptime 60 s at 10:00:00)
       trains from 10:00:30; checkpoints 100 (made 10:10:30), 200 (made 10:20:30);
       notice 10:25:30 (interruption, terminate); the emergency commit fails; exit 10:26:00.
    B  i-b  g5.2xlarge  spot, price from --price 0.50/h; up since 10:26:00 (120 s at 10:28)
       restores 200 at 10:29:00 and trains; 300 (10:39:00, seen 10:39:10: first step),
       400 (10:49:00); an operator's stop at 10:53:55 (signal, not an interruption), the
       interrupt checkpoint 450 (10:54:00) committed; exit 10:54:10.
    C  i-c  g5.xlarge   on-demand (list price 1.006/h); boots 11:00:00 (uptime 0)
       restores 450 at 11:00:30 and trains; final 500 (11:05:30); exit 11:05:45.
    """
    clock = SetClock()

    def boot(boot_hms: str, hex_id: str) -> RunLedger:
        clock.set(boot_hms)
        return RunLedger(
            store,
            boot_id=f"{DAY.replace('-', '')}T{boot_hms.replace(':', '')}Z-{hex_id}",
            clock=clock,
        )

    def commit(
        ledger: RunLedger, seen: str, step: int, made: str, reason: str = "periodic"
    ) -> None:
        clock.set(seen)
        ledger.commit(step=step, reason=reason, bytes=1000, seconds=10.0, created_at=iso(made))

    a = boot("10:00:00", "aaaaaaaaaaaaaaaa")
    a.boot(
        node_id="i-a",
        nodes=1,
        slot=0,
        uptime_s=60.0,
        version="test",
        instance=InstanceFacts("i-a", "g5.xlarge", "us-east-1a", "spot"),
        price_usd_per_hour=0.40,
    )
    clock.set("10:00:20")
    a.restore(step=None, bytes=0, seconds=0.0, downloaded=False)
    clock.set("10:00:30")
    a.train_start(step=None)
    clock.set("10:10:40")
    a.first_step(step=100)
    commit(a, "10:10:40", 100, "10:10:30")
    commit(a, "10:20:40", 200, "10:20:30")
    clock.set("10:25:30")
    a.notice(kind="interruption", action="terminate", deadline=iso("10:27:30"))
    clock.set("10:25:59")
    a.stop(reason="notice", committed_step=200)
    clock.set("10:26:00")
    a.exit(code=0)
    assert a.close(10)

    b = boot("10:28:00", "bbbbbbbbbbbbbbbb")
    b.boot(
        node_id="i-b",
        nodes=1,
        slot=0,
        uptime_s=120.0,
        version="test",
        instance=InstanceFacts("i-b", "g5.2xlarge", "us-east-1b", "spot"),
    )
    clock.set("10:29:00")
    b.restore(step=200, bytes=1000, seconds=55.0, downloaded=True)
    b.train_start(step=200)
    clock.set("10:39:10")
    b.first_step(step=300)
    commit(b, "10:39:10", 300, "10:39:00")
    commit(b, "10:49:10", 400, "10:49:00")
    clock.set("10:53:55")
    b.notice(kind="signal", action="shutdown", deadline=iso("10:55:25"))
    commit(b, "10:54:05", 450, "10:54:00", reason="interrupt")
    b.stop(reason="shutdown", committed_step=450)
    clock.set("10:54:10")
    b.exit(code=0)
    assert b.close(10)

    c = boot("11:00:00", "cccccccccccccccc")
    c.boot(
        node_id="i-c",
        nodes=1,
        slot=0,
        uptime_s=0.0,
        version="test",
        instance=InstanceFacts("i-c", "g5.xlarge", "us-east-1c", "on-demand"),
    )
    clock.set("11:00:30")
    c.restore(step=450, bytes=1000, seconds=30.0, downloaded=True)
    c.train_start(step=450)
    clock.set("11:05:40")
    c.first_step(step=500)
    commit(c, "11:05:40", 500, "11:05:30", reason="final")
    clock.set("11:05:42")
    c.stop(reason="complete", committed_step=500)
    clock.set("11:05:45")
    c.exit(code=0)
    assert c.close(10)


def commit_checkpoint(s3: Any, bucket: str, step: int, reason: str, created: str) -> None:
    """A real committed checkpoint in storage (CONTRACT §5): one file, then the manifest."""
    base = f"{PREFIX}/{RUN}/checkpoints/step-{step:09d}/"
    data = f"weights at {step}".encode()
    s3.put_object(Bucket=bucket, Key=base + "model.pt", Body=data)
    manifest = {
        "format": "spot-checkpoint/1",
        "run_id": RUN,
        "step": step,
        "created_at": created,
        "reason": reason,
        "files": [
            {"path": "model.pt", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        ],
    }
    s3.put_object(Bucket=bucket, Key=base + "manifest.json", Body=json.dumps(manifest).encode())


# What the hand gives for the run above.
INSTANCE_A = (at("10:26:00") - at("09:59:00")).total_seconds()  # 1620
INSTANCE_B = (at("10:54:10") - at("10:26:00")).total_seconds()  # 1690
INSTANCE_C = (at("11:05:45") - at("11:00:00")).total_seconds()  # 345
WALL = (at("11:05:45") - at("09:59:00")).total_seconds()  # 4005
TRAIN_A = (at("10:20:30") - at("10:00:30")).total_seconds()  # 1200: to checkpoint 200
TRAIN_B = (at("10:54:00") - at("10:29:00")).total_seconds()  # 1500: to checkpoint 450
TRAIN_C = (at("11:05:30") - at("11:00:30")).total_seconds()  # 300: to checkpoint 500
TRAINING = TRAIN_A + TRAIN_B + TRAIN_C  # 3000
LOST_S = (at("10:25:30") - at("10:20:30")).total_seconds()  # 300: checkpoint 200 -> notice
RATE_A = 100 / 600  # steps 100 -> 200 in 10:10:30 -> 10:20:30
RECOVERY = (at("10:39:10") - at("10:25:30")).total_seconds()  # 820: notice -> B's first step
RESUMED = (at("10:29:00") - at("10:25:30")).total_seconds()  # 210: notice -> B's trainer
G5X_OD, G5_2X_OD = 1.006, 1.212  # daemon/fleet/catalog.py, us-east-1
SPOT_USD = INSTANCE_A / 3600 * 0.40 + INSTANCE_B / 3600 * 0.50 + INSTANCE_C / 3600 * G5X_OD
ON_DEMAND_USD = (INSTANCE_A + INSTANCE_C) / 3600 * G5X_OD + INSTANCE_B / 3600 * G5_2X_OD
TRAINING_OD_USD = (TRAIN_A + TRAIN_C) / 3600 * G5X_OD + TRAIN_B / 3600 * G5_2X_OD


@pytest.fixture(scope="module")
def known_run(s3_server: LocalS3) -> Iterator[tuple[CheckpointStore, str]]:
    """The run above in a bucket of its own, with its last two checkpoints committed and
    the run complete (the report's other sources)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    store = make_store(s3_server.endpoint_url, bucket)
    write_known_run(store)
    commit_checkpoint(s3, bucket, 450, "interrupt", iso("10:54:00"))
    commit_checkpoint(s3, bucket, 500, "final", iso("11:05:30"))
    s3.put_object(
        Bucket=bucket,
        Key=f"{PREFIX}/{RUN}/complete.json",
        Body=json.dumps({"step": 500, "completed_at": iso("11:05:44")}).encode(),
    )
    yield store, bucket


@pytest.fixture(scope="module")
def report_dir(
    known_run: tuple[CheckpointStore, str], s3_server: LocalS3, tmp_path_factory: Any
) -> Path:
    """``spot-supervisor report`` run once on the known run."""
    _, bucket = known_run
    out = tmp_path_factory.mktemp("report")
    code = report_main(
        [
            "--remote",
            f"s3://{bucket}/{PREFIX}",
            "--run-id",
            RUN,
            "--endpoint-url",
            s3_server.endpoint_url,
            "--region",
            "us-east-1",
            "--price",
            "g5.2xlarge=0.50",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_every_figure_of_a_known_run(known_run: tuple[CheckpointStore, str]) -> None:
    store, _ = known_run
    boots = read_ledger(store)
    committed = [
        Committed(450, "interrupt", at("10:54:00"), 14),
        Committed(500, "final", at("11:05:30"), 14),
    ]
    f = compute(
        boots,
        committed,
        run_id=RUN,
        pricing=Pricing(spot={"g5.2xlarge": 0.50}),
        complete=True,
        now=at("12:00:00"),
    )
    approx = pytest.approx

    assert f["boots"] == 3 and f["instances"] == 3
    assert f["started_at"] == iso("09:59:00.000") and f["ended_at"] == iso("11:05:45.000")
    assert f["wall_clock_seconds"] == WALL == 4005
    assert f["instance_seconds"] == INSTANCE_A + INSTANCE_B + INSTANCE_C == 3655
    assert f["instance_hours"] == approx(3655 / 3600, abs=1e-6)
    assert f["training_seconds"] == f["training_instance_seconds"] == TRAINING == 3000
    assert f["goodput"] == approx(3000 / 3655, abs=1e-6)  # 0.8208
    assert f["overhead"]["ratio"] == approx((4005 - 3000) / 3000, abs=1e-6)  # 0.335
    assert f["overhead"]["percent"] == approx(33.5, abs=1e-3)
    assert f["overhead"]["seed_budget_percent"] == [10.0, 15.0]
    assert f["overhead"]["verdict"] == "over"
    # The operator's stop of B is not an interruption; A's spot notice is.
    assert f["interruptions"] == 1 and f["standby_interruptions"] == 0
    assert f["lost_seconds"] == LOST_S == 300
    assert f["lost_steps"] == round(LOST_S * RATE_A) == 50
    assert f["recovery_seconds_mean"] == f["recovery_seconds_max"] == RECOVERY == 820
    (i,) = f["per_interruption"]
    assert i == {
        "boot_id": "20261201T100000Z-aaaaaaaaaaaaaaaa",
        "instance_id": "i-a",
        "instance_type": "g5.xlarge",
        "at": iso("10:25:30.000"),
        "cause": "notice",
        "kind": "interruption",
        "action": "terminate",
        "saved_step": 200,
        "saved_at": iso("10:20:30.000"),
        "lost_seconds": 300.0,
        "lost_steps": 50,
        "recovered_by": "20261201T102800Z-bbbbbbbbbbbbbbbb",
        "recovery_seconds": 820.0,
        "resumed_seconds": RESUMED,
    }
    cost = f["cost"]
    assert cost["spot_usd"] == approx(SPOT_USD, abs=1e-4)  # 0.18 + 0.23472 + 0.09641
    assert cost["spot_usd"] == approx(0.5111, abs=1e-4)
    assert cost["on_demand_usd"] == approx(ON_DEMAND_USD, abs=1e-4)  # 1.1181
    assert cost["saving"] == approx(1 - SPOT_USD / ON_DEMAND_USD, abs=1e-5)
    assert cost["on_demand_training_usd"] == approx(TRAINING_OD_USD, abs=1e-4)
    assert cost["unpriced"] == []
    rows = {r["instance_id"]: r for r in f["per_instance"]}
    assert {k: rows[k]["seconds"] for k in rows} == {"i-a": 1620, "i-b": 1690, "i-c": 345}
    assert (rows["i-a"]["price_usd_per_hour"], rows["i-a"]["price_source"]) == (0.40, "ledger")
    assert (rows["i-b"]["price_usd_per_hour"], rows["i-b"]["price_source"]) == (0.50, "--price")
    assert rows["i-c"]["price_usd_per_hour"] == G5X_OD  # on demand: its on-demand price
    assert rows["i-b"]["on_demand_usd_per_hour"] == G5_2X_OD
    per_boot = f["per_boot"]
    assert [b["training_seconds"] for b in per_boot] == [TRAIN_A, TRAIN_B, TRAIN_C]
    assert [b["restored_step"] for b in per_boot] == [None, 200, 450]
    assert [b["last_committed_step"] for b in per_boot] == [200, 450, 500]
    assert [b["exit_code"] for b in per_boot] == [0, 0, 0]
    assert [b["stop_reason"] for b in per_boot] == ["notice", "shutdown", "complete"]
    assert f["newest_committed_step"] == 500 and f["complete"] is True
    tl = f["timeline"]
    assert [lane["lane"] for lane in tl["lanes"]] == ["i-a", "i-b", "i-c"]
    assert tl["lanes"][0]["lost"] == [[iso("10:20:30.000"), iso("10:25:30.000")]]
    assert tl["lanes"][1]["lost"] == [] and tl["lanes"][2]["lost"] == []
    assert [s[1] for s in tl["committed_steps"]] == [100, 200, 300, 400, 450, 500]
    kinds = [m["kind"] for m in tl["markers"]]
    assert kinds.count("notice") == 1 and kinds.count("stop") == 1  # B's operator stop
    assert kinds.count("commit") == 6 and kinds.count("restore") == 3


def test_report_json_keys_are_stable_and_documented(report_dir: Path) -> None:
    f = json.loads((report_dir / "report.json").read_text())
    for key in ("interruptions", "boots", "lost_steps", "goodput", "cost"):
        assert key in f, key
    assert {"spot_usd", "on_demand_usd"} <= f["cost"].keys()
    assert (f["interruptions"], f["boots"], f["lost_steps"]) == (1, 3, 50)
    assert f["cost"]["spot_usd"] == pytest.approx(SPOT_USD, abs=1e-4)
    assert f["cost"]["on_demand_usd"] == pytest.approx(ON_DEMAND_USD, abs=1e-4)
    # What storage says: the committed checkpoints and complete.json.
    assert f["newest_committed_step"] == 500 and f["complete"] is True
    doc = report_figures.__doc__ or ""
    nested = [
        *f["cost"],
        *f["overhead"],
        *f["per_boot"][0],
        *f["per_instance"][0],
        *f["per_interruption"][0],
        *f["timeline"],
        *f["timeline"]["lanes"][0],
        *f["timeline"]["markers"][0],
    ]
    for key in [*f, *nested]:
        assert f"``{key}``" in doc, f"report.json key {key!r} is not documented in figures.py"


def test_timeline_png_is_a_real_picture(report_dir: Path) -> None:
    raw = (report_dir / "timeline.png").read_bytes()
    assert raw[:8] == PNG_MAGIC and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert width >= 1000 and height >= 300
    from PIL import Image  # matplotlib's own dependency

    with Image.open(report_dir / "timeline.png") as img:
        img.load()  # decodes every byte: a truncated or corrupt file raises
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50  # lanes, markers, text: not an empty canvas


def test_report_html_opens_in_chromium_without_errors(report_dir: Path) -> None:
    if find_chromium() is None:
        pytest.fail(INSTALL_HINT)
    page = report_dir / "report.html"
    html = page.read_text()
    assert "<script" not in html.lower()
    assert "http://" not in html and "https://" not in html
    check = load_page(page.as_uri())
    (report_dir / "screenshot.png").write_bytes(check.screenshot)
    assert check.problems == [], check.problems
    assert check.title == f"spot-supervisor report: {RUN}"
    (img,) = check.images
    assert img["src"] == (report_dir / "timeline.png").as_uri()
    assert img["complete"] and img["width"] > 1000 and img["height"] > 300, img
    # Everything the page loaded is one of the report's own files.
    assert set(check.requested) == {page.as_uri(), (report_dir / "timeline.png").as_uri()}
    assert check.screenshot[:8] == PNG_MAGIC


def test_report_command_exit_codes(
    s3_server: LocalS3, bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    remote = ["--remote", f"s3://{bucket}/{PREFIX}", "--endpoint-url", s3_server.endpoint_url]
    assert report_main([*remote, "--run-id", RUN, "--price", "g5.xlarge"]) == 2
    assert "--price: 'g5.xlarge' must be TYPE=USD" in capsys.readouterr().err
    assert report_main(remote) == 2
    assert "--remote needs --run-id" in capsys.readouterr().err
    assert report_main([*remote, "--run-id", "bad/id"]) == 2
    assert report_main(["--remote", "http://x", "--run-id", RUN]) == 2
    assert report_main([*remote, "--run-id", RUN, "--out", str(tmp_path / "r")]) == 1
    assert "no ledger for run report-run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_report_from_a_config_file_into_the_default_directory(
    known_run: tuple[CheckpointStore, str],
    s3_server: LocalS3,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, bucket = known_run
    config = tmp_path / "config.toml"
    config.write_text(
        f'[run]\nid = "{RUN}"\ncommand = ["python", "train.py"]\n'
        f'[checkpoints]\nlocal_dir = "{tmp_path / "ckpt"}"\nremote = "s3://{bucket}/{PREFIX}"\n'
        f'[s3]\nendpoint_url = "{s3_server.endpoint_url}"\nregion = "us-east-1"\n'
    )
    monkeypatch.chdir(tmp_path)
    assert report_main(["--config", str(config), "--json", "--on-demand", "g5.xlarge=2.0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / f"report-{RUN}" / "report.json").read_text())
    assert printed["cost"] == written["cost"]
    # No --price for g5.2xlarge here: i-b has no price, and says so.
    assert written["cost"]["unpriced"] == ["i-b"]
    rows = {r["instance_id"]: r for r in written["per_instance"]}
    assert rows["i-a"]["on_demand_usd_per_hour"] == 2.0
    assert rows["i-a"]["on_demand_source"] == "--on-demand"
    assert rows["i-c"]["price_usd_per_hour"] == 2.0  # the on-demand instance pays it
    assert {p.name for p in (tmp_path / f"report-{RUN}").iterdir()} == {
        "report.json",
        "timeline.png",
        "report.html",
    }
