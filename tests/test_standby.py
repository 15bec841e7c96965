"""One run, several instances over time (issue 13): leases per slot, the standby, the
handoff. Real supervisor processes, each a simulated instance with its own metadata
emulator (its own instance id) and disk, sharing one bucket (moto over HTTP)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SCRIPTED_TRAINER
from instances import Instances, kill_instance

from daemon.standins import LocalS3
from daemon.standins.demo import SupervisorProcess, trainer_command
from daemon.standins.faultproxy import FaultProxy

RUN_ID = "standby-run"
FINAL_RE = re.compile(r"^final_params_sha256=([0-9a-f]{64})$")


def scripted(steps: int, *args: str) -> list[str]:
    return [sys.executable, SCRIPTED_TRAINER, str(steps), *args]


@pytest.fixture
def instances(tmp_path: Path, s3_server: LocalS3, bucket: str) -> Iterator[Instances]:
    fleet = Instances(
        tmp_path, s3_server.endpoint_url, bucket, RUN_ID, scripted(100000, "--step-seconds", "0.05")
    )
    yield fleet
    fleet.close()


def in_standby(sup: SupervisorProcess, timeout: float = 60) -> dict[str, Any]:
    return sup.wait_for(
        lambda e: e.get("event") == "phase_changed" and e.get("phase") == "standby",
        timeout,
        "standby",
    )


def state(tmp_path: Path, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((tmp_path / name / "run" / "state.json").read_text())
    return doc


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def test_early_replacement_waits_in_standby_and_takes_over_at_the_notice(
    tmp_path: Path, s3_server: LocalS3, bucket: str, s3_client: Any
) -> None:
    command = trainer_command(steps=40, save_every=5, step_seconds=0.1)
    env = {**os.environ, "SPOT_CHECKPOINT_DIR": str(tmp_path / "ref"), "SPOT_RUN_ID": "ref"}
    ref = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    want = [m.group(1) for ln in ref.stdout.splitlines() if (m := FINAL_RE.match(ln))]
    assert ref.returncode == 0 and len(want) == 1, ref.stderr

    fleet = Instances(tmp_path, s3_server.endpoint_url, bucket, RUN_ID, command)
    try:
        holder, eh = fleet.boot("holder")
        holder.wait_for(lambda e: e.get("event") == "checkpoint_committed", 120, "a commit")
        # Capacity rebalancing: the recommendation, then the group starts a replacement.
        eh.set_rebalance()
        holder.wait_for(lambda e: e.get("event") == "early_checkpoint_requested", 30, "SIGUSR1")
        standby, _ = fleet.boot("standby")
        in_standby(standby)
        assert state(tmp_path, "standby")["phase"] == "standby"
        assert not standby.find("child_started")  # no trainer beside the holder's
        ready = standby.wait_for(lambda e: e.get("event") == "restore_completed", 30, "restore")
        assert ready["step"] >= 5  # already restored while waiting
        eh.set_notice("terminate", now() + dt.timedelta(seconds=60))
        assert holder.wait_exit(90) == 0
        assert holder.find("emergency_committed") and holder.find("lease_released")
        handoff = standby.wait_for(lambda e: e.get("event") == "slot_handoff", 60, "handoff")
        assert handoff["how"] == "released"
        assert handoff["handoff_seconds"] <= handoff["restore_seconds"] + 5
        assert standby.wait_exit(240) == 0, "\n".join(standby.lines[-30:])
        got = [m for s in (holder, standby) for ln in s.lines for m in FINAL_RE.findall(ln)]
        assert got == want
    finally:
        fleet.close()


def test_a_holder_killed_without_release_is_taken_over_after_the_ttl(
    instances: Instances,
) -> None:
    holder, _ = instances.boot("holder", lease_ttl=4)
    holder.wait_for(lambda e: e.get("event") == "checkpoint_committed", 60, "a commit")
    standby, _ = instances.boot("standby", lease_ttl=4)
    in_standby(standby)
    kill_instance(holder)  # no notice, no release: the lease just stops being renewed
    killed_at = time.monotonic()
    taken = standby.wait_for(lambda e: e.get("event") == "lease_taken", 60, "the takeover")
    assert taken["how"] == "expired" and taken["previous_holder"] == f"i-{'holder':0>17}"
    # Within the TTL plus a poll (and the read-back), measured from outside.
    assert time.monotonic() - killed_at < 4 + 10
    standby.wait_for(lambda e: e.get("event") == "child_started", 60, "the trainer")
    assert standby.proc is not None
    standby.proc.send_signal(signal.SIGTERM)
    assert standby.wait_exit(60) == 0


def test_two_standbys_race_for_one_freed_slot_and_exactly_one_wins(
    instances: Instances,
) -> None:
    holder, _ = instances.boot("holder")
    holder.wait_for(lambda e: e.get("event") == "checkpoint_committed", 60, "a commit")
    b, _ = instances.boot("b")
    c, _ = instances.boot("c")
    in_standby(b)
    in_standby(c)
    assert holder.proc is not None
    holder.proc.send_signal(signal.SIGTERM)  # an orderly stop frees the slot
    assert holder.wait_exit(60) == 0
    winner = None
    end = time.monotonic() + 60
    while winner is None and time.monotonic() < end:
        started = [s for s in (b, c) if s.find("child_started")]
        winner = started[0] if started else None
        time.sleep(0.2)
    assert winner is not None, "nobody took the freed slot"
    loser = c if winner is b else b
    time.sleep(5)  # several more polls of the loser: it must stay in standby
    assert not loser.find("child_started") and loser.proc is not None
    assert loser.proc.poll() is None
    assert [e["phase"] for e in loser.events if e.get("event") == "phase_changed"][-1] == "standby"
    for s in (winner, loser):
        assert s.proc is not None
        s.proc.send_signal(signal.SIGTERM)
        assert s.wait_exit(60) == 0


def test_a_standby_never_aborts_the_holders_emergency_upload(
    tmp_path: Path, s3_server: LocalS3, bucket: str, s3_client: Any
) -> None:
    with FaultProxy(s3_server.endpoint_url, seed=5) as proxy:
        fleet = Instances(
            tmp_path,
            proxy.url,
            bucket,
            RUN_ID,
            scripted(100000, "--step-seconds", "0.2", "--save-every", "999", "--state-kb", "16384"),
        )
        try:
            holder, eh = fleet.boot("holder", s3={"part_size_mb": 5})
            holder.wait_for_line("resumed", 60)
            # A slow link: the 16 MiB emergency checkpoint goes up as a multipart upload.
            proxy.throttle(2_000_000, "request", method="PUT")
            eh.set_notice("terminate", now() + dt.timedelta(seconds=90))
            holder.wait_for(
                lambda e: e.get("event") == "phase_changed" and e.get("phase") == "uploading",
                60,
                "the emergency upload",
            )
            uploads = wait_for_multipart(s3_client, bucket)
            # Boots while that upload is in flight.
            standby, _ = fleet.boot("standby", s3={"part_size_mb": 5})
            in_standby(standby)
            assert holder.wait_exit(90) == 0
            assert holder.find("emergency_committed"), "\n".join(holder.lines[-30:])
            assert not standby.find("multipart_uploads_aborted")
            assert uploads
        finally:
            fleet.close()


def wait_for_multipart(s3_client: Any, bucket: str, timeout: float = 30) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        if found:
            return [u["Key"] for u in found]
        time.sleep(0.1)
    raise AssertionError("no multipart upload in flight")


def test_a_standby_that_gets_its_own_notice_exits_without_training(
    instances: Instances,
) -> None:
    holder, _ = instances.boot("holder")
    holder.wait_for(lambda e: e.get("event") == "checkpoint_committed", 60, "a commit")
    standby, es = instances.boot("standby")
    in_standby(standby)
    es.set_notice("terminate", now() + dt.timedelta(seconds=60))
    assert standby.wait_exit(60) == 0
    assert standby.find("standby_stopped") and not standby.find("child_started")
    assert not standby.find("lease_taken")
    assert holder.proc is not None and holder.proc.poll() is None  # the holder trains on
    assert holder.find("checkpoint_committed")


def test_standby_phase_reaches_the_metrics(tmp_path: Path, instances: Instances) -> None:
    holder, _ = instances.boot("holder")
    holder.wait_for(lambda e: e.get("event") == "checkpoint_committed", 60, "a commit")
    prom = tmp_path / "standby-metrics" / "spot.prom"
    standby, _ = instances.boot("standby", metrics=str(prom))
    in_standby(standby)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        prom.exists() and 'phase="standby"} 1' in prom.read_text()
    ):
        time.sleep(0.2)
    assert f'spot_supervisor_phase{{run_id="{RUN_ID}",phase="standby"}} 1' in prom.read_text()
    assert standby.proc is not None
    standby.proc.send_signal(signal.SIGTERM)
    assert standby.wait_exit(60) == 0


def test_a_holder_that_cannot_renew_keeps_training_and_keeps_trying(
    tmp_path: Path, s3_server: LocalS3, bucket: str
) -> None:
    with FaultProxy(s3_server.endpoint_url, seed=9) as proxy:
        fleet = Instances(
            tmp_path, proxy.url, bucket, RUN_ID, scripted(100000, "--step-seconds", "0.05")
        )
        try:
            holder, _ = fleet.boot("holder", lease_ttl=3)
            holder.wait_for(lambda e: e.get("event") == "checkpoint_committed", 60, "a commit")
            # The bucket refuses the lease object for a while (S3 unreachable for it).
            rule = proxy.error(503, "SlowDown", method="PUT", path="/leases/")
            holder.wait_for(lambda e: e.get("event") == "lease_renew_failed", 30, "a failure")
            proxy.remove(rule)
            renewed_from = len(holder.events)
            time.sleep(2)  # a few more heartbeats (every ttl / 6 = 0.5 s)
            assert holder.proc is not None and holder.proc.poll() is None
            assert not holder.find("child_exited")  # training went on throughout
            assert not [e for e in holder.events[renewed_from:] if e.get("event") == "lease_lost"]
            holder.proc.send_signal(signal.SIGTERM)
            assert holder.wait_exit(60) == 0
            assert holder.find("lease_released")  # still its slot to release
        finally:
            fleet.close()
