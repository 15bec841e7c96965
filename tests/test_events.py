"""Everything the instance can say, end to end: a real supervisor process, the metadata
emulator over HTTP serving each event as AWS documents it, moto over HTTP, and the
torch-free scripted trainer."""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from pathlib import Path
from typing import Any

from conftest import SUPERVISOR_RUN_ID as RUN_ID

from daemon.standins.emulator import MetadataEmulator, scheduled_event


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def manifest_reasons(s3_client: Any, bucket: str) -> dict[int, str]:
    out = {}
    prefix = f"runs/{RUN_ID}/checkpoints/"
    for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        if o["Key"].endswith("/manifest.json"):
            doc = json.loads(s3_client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
            out[doc["step"]] = doc["reason"]
    return out


def stop(sup: Any) -> None:
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait_exit(60) == 0


def test_rebalance_recommendation_gets_an_early_checkpoint_and_training_goes_on(
    boot: Any, emulator: MetadataEmulator, s3_client: Any, bucket: str
) -> None:
    sup = boot("100000", "--step-seconds", "0.05", "--save-every", "1000")
    sup.wait_for_line("resumed", 30)
    emulator.set_rebalance()
    asked = sup.wait_for(lambda e: e.get("event") == "early_checkpoint_requested", 30, "SIGUSR1")
    assert asked["child_signalled"] is True
    committed = sup.wait_for(lambda e: e.get("event") == "checkpoint_committed", 30, "commit")
    assert manifest_reasons(s3_client, bucket)[committed["step"]] == "requested"
    assert not sup.find("child_exited")  # training goes on
    assert sup.proc.poll() is None
    stop(sup)


def schedule(emulator: MetadataEmulator, code: str, seconds: float, event_id: str) -> dt.datetime:
    """One scheduled event ``seconds`` from now (second precision, as AWS gives it)."""
    not_before = (now() + dt.timedelta(seconds=seconds)).replace(microsecond=0)
    emulator.set_scheduled_events([scheduled_event(code, not_before, event_id=event_id)])
    return not_before


def test_scheduled_maintenance_asks_for_a_checkpoint_and_training_goes_on(
    boot: Any, emulator: MetadataEmulator, s3_client: Any, bucket: str
) -> None:
    """Defect: a scheduled event drained (SIGTERM, exit) a healthy instance that AWS might
    not touch for days. Now it asks for a checkpoint, committed before NotBefore; the
    event itself arrives as the OS shutdown, i.e. `systemctl stop`."""
    sup = boot("100000", "--step-seconds", "0.05", "--save-every", "1000")
    sup.wait_for_line("resumed", 30)
    # The documented form, e.g. "21 Jan 2019 09:00:43 GMT", 8 s past the action lead.
    not_before = (now() + dt.timedelta(seconds=130)).replace(microsecond=0)
    event = scheduled_event("instance-retirement", not_before)
    assert event["NotBefore"].endswith(" GMT") and len(event["NotBefore"].split()) == 5
    emulator.set_scheduled_events([event])
    sched = sup.wait_for(lambda e: e.get("event") == "maintenance_scheduled", 30, "scheduling")
    assert sched["action"] == "instance-retirement" and sched["event_id"] == event["EventId"]
    assert 0 < sched["act_in_s"] <= 10
    asked = sup.wait_for(
        lambda e: e.get("event") == "maintenance_checkpoint_requested", 30, "the request"
    )
    assert asked["child_signalled"] is True and asked["seconds_to_not_before"] > 100
    committed = sup.wait_for(lambda e: e.get("event") == "checkpoint_committed", 30, "commit")
    assert manifest_reasons(s3_client, bucket)[committed["step"]] == "requested"
    time.sleep(1.5)
    assert not [e for e in sup.events if e.get("phase") == "draining"]
    assert not [e for e in sup.find("child_signalled") if e["signal"] == "SIGTERM"]
    assert sup.proc.poll() is None and not sup.find("child_exited")  # training goes on
    assert len(sup.find("maintenance_checkpoint_requested")) == 1
    stop(sup)


def test_a_cancelled_maintenance_event_changes_nothing(
    boot: Any, emulator: MetadataEmulator
) -> None:
    sup = boot("100000", "--step-seconds", "0.05", "--save-every", "1000")
    sup.wait_for_line("resumed", 30)
    not_before = schedule(emulator, "system-reboot", 129, "instance-event-0123456789abcdef0")
    sup.wait_for(lambda e: e.get("event") == "maintenance_scheduled", 30, "scheduling")
    # AWS keeps a cancelled event in the list, with State "canceled".
    emulator.set_scheduled_events(
        [
            scheduled_event(
                "system-reboot",
                not_before,
                event_id="instance-event-0123456789abcdef0",
                state="canceled",
            )
        ]
    )
    gone = sup.wait_for(lambda e: e.get("event") == "maintenance_cancelled", 30, "cancel")
    assert gone["checkpoint_requested"] is False
    # Past the time the checkpoint would have been asked for: nothing happened.
    time.sleep(max(0.0, (not_before - now()).total_seconds() - 120 + 2))
    assert not sup.find("maintenance_checkpoint_requested")
    assert not [e for e in sup.events if e.get("phase") == "draining"]
    assert sup.proc.poll() is None
    stop(sup)


def test_a_maintenance_event_moved_later_is_acted_on_at_its_new_time(
    boot: Any, emulator: MetadataEmulator
) -> None:
    sup = boot("100000", "--step-seconds", "0.05", "--save-every", "1000")
    sup.wait_for_line("resumed", 30)
    event_id = "instance-event-0fedcba9876543210"
    first = schedule(emulator, "instance-stop", 134, event_id)
    sup.wait_for(lambda e: e.get("event") == "maintenance_scheduled", 30, "scheduling")
    later = schedule(emulator, "instance-stop", 145, event_id)
    moved = sup.wait_for(lambda e: e.get("event") == "maintenance_rescheduled", 30, "the move")
    assert moved["event_id"] == event_id
    asked = sup.wait_for(
        lambda e: e.get("event") == "maintenance_checkpoint_requested", 60, "the request"
    )
    assert asked["not_before"] == later.isoformat()
    # At the new time: the lead (120 s) plus the margin (2 s) before the new NotBefore,
    # not 11 s earlier, when the first NotBefore was due.
    assert 120 <= asked["seconds_to_not_before"] <= 125
    assert (later - first).total_seconds() >= 10
    assert len(sup.find("maintenance_checkpoint_requested")) == 1
    assert sup.proc.poll() is None
    stop(sup)


def test_stop_action_drains_like_terminate(
    boot: Any, emulator: MetadataEmulator, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    sup = boot("100000", "--step-seconds", "0.05", "--save-every", "1000")
    sup.wait_for_line("resumed", 30)
    emulator.set_notice("stop", now() + dt.timedelta(seconds=60))
    assert sup.wait_exit(60) == 0
    assert json.loads((tmp_path / "run" / "notice.json").read_text())["action"] == "stop"
    step = sup.find("emergency_committed")[0]["committed_step"]
    assert manifest_reasons(s3_client, bucket)[step] == "interrupt"


def test_hibernate_is_acted_on_at_once_without_killing_the_trainer(
    boot: Any, emulator: MetadataEmulator, s3_client: Any, bucket: str
) -> None:
    sup = boot("100000", "--step-seconds", "0.05", "--save-every", "1000")
    sup.wait_for_line("resumed", 30)
    emulator.set_notice("hibernate")  # no two-minute warning: its time is now
    asked = sup.wait_for(
        lambda e: e.get("event") == "hibernate_checkpoint_requested", 30, "the hibernate notice"
    )
    assert asked["child_signalled"] is True
    committed = sup.wait_for(lambda e: e.get("event") == "checkpoint_committed", 30, "commit")
    tail = "\n".join(sup.lines[-40:])
    assert manifest_reasons(s3_client, bucket)[committed["step"]] == "requested", tail
    assert not [e for e in sup.find("child_signalled") if e["signal"] == "SIGTERM"], tail
    assert sup.proc.poll() is None and not sup.find("child_exited"), tail
    stop(sup)


def test_a_notice_seen_on_many_polls_is_one_event(boot: Any, emulator: MetadataEmulator) -> None:
    sup = boot("100000", "--step-seconds", "0.05", "--save-every", "1000", stop_budget=30)
    sup.wait_for_line("resumed", 30)
    emulator.set_rebalance()
    sup.wait_for(lambda e: e.get("event") == "early_checkpoint_requested", 30, "first")
    # Rebalance is polled every 5th round at 0.2 s: several more polls see the same notice.
    sup.wait_for(lambda e: e.get("event") == "checkpoint_committed", 30, "commit")
    time.sleep(3)
    assert len(sup.find("early_checkpoint_requested")) == 1
    received = [e for e in sup.find("notice_received") if e.get("kind") == "rebalance"]
    assert len(received) == 1
    stop(sup)


def test_metadata_faults_keep_the_daemon_polling_then_a_notice_still_lands(
    boot: Any, emulator: MetadataEmulator, s3_client: Any, bucket: str
) -> None:
    sup = boot("100000", "--step-seconds", "0.05", "--save-every", "1000")
    sup.wait_for_line("resumed", 30)
    action = "/latest/meta-data/spot/instance-action"
    emulator.add_fault("status", action, count=4, status=429)
    emulator.add_fault("status", action, count=4, status=503)
    emulator.add_fault("close", action, count=3)
    emulator.add_fault("malformed", action, count=3, status=200)
    sup.wait_for(lambda e: e.get("event") == "imds_degraded", 30, "a degraded warning")
    sup.wait_for(lambda e: e.get("event") == "imds_recovered", 30, "recovery")
    # A token PUT that hangs past the client's timeout (the hop-limit symptom).
    emulator.expire_tokens()
    emulator.add_fault("delay", "/latest/api/token", count=2, delay_s=2.0)
    sup.wait_for(
        lambda e: e.get("event") == "imds_unavailable" and "token" in e.get("error", ""),
        30,
        "a token timeout",
    )
    assert sup.proc.poll() is None  # never a crash
    degraded = sup.find("imds_degraded")
    assert degraded[0]["count"] >= 3
    emulator.set_notice("terminate", now() + dt.timedelta(seconds=60))
    assert sup.wait_exit(60) == 0
    assert sup.find("emergency_committed")
