"""The report's figures for runs other than test_report.py's known run: an emergency commit
after the notice, a standby handoff, a boot gone without a notice, a standby's notice.

Each ledger is written by the daemon's own writer to moto's S3 server, with a clock the
test sets, and read back as the report reads it; every figure is worked out by hand.
"""

from __future__ import annotations

from test_report import RUN, SetClock, at, iso, make_store

from daemon.ledger import InstanceFacts, RunLedger, read_ledger
from daemon.report.figures import compute
from daemon.standins import LocalS3


def test_an_emergency_commit_after_the_notice_loses_nothing(
    s3_server: LocalS3, bucket: str
) -> None:
    """The notice at 10:25:30; the interrupt checkpoint, made at 10:25:34 after it, is
    committed: no work lost; recovery runs to the next boot's first step."""
    store = make_store(s3_server.endpoint_url, bucket)
    clock = SetClock().set("10:00:00")
    a = RunLedger(store, boot_id="20261201T100000Z-aaaaaaaaaaaaaaaa", clock=clock)
    a.boot(
        node_id="a",
        nodes=1,
        uptime_s=0.0,
        instance=InstanceFacts("i-a", "g5.xlarge", "us-east-1a", "spot"),
        price_usd_per_hour=0.4,
    )
    a.train_start(step=None)
    clock.set("10:10:00")
    a.commit(step=100, reason="periodic", bytes=1, seconds=1.0, created_at=iso("10:09:58"))
    clock.set("10:25:30")
    a.notice(kind="interruption", action="terminate", deadline=iso("10:27:30"))
    clock.set("10:25:40")
    a.commit(step=155, reason="interrupt", bytes=1, seconds=5.0, created_at=iso("10:25:34"))
    a.stop(reason="notice", committed_step=155)
    a.exit(code=0)
    assert a.close(10)
    clock.set("10:26:00")
    b = RunLedger(store, boot_id="20261201T102600Z-bbbbbbbbbbbbbbbb", clock=clock)
    b.boot(
        node_id="b",
        nodes=1,
        uptime_s=60.0,
        instance=InstanceFacts("i-b", "g5.xlarge", "us-east-1a", "spot"),
        price_usd_per_hour=0.4,
    )
    clock.set("10:26:30")
    b.restore(step=155, bytes=1, seconds=20.0, downloaded=True)
    b.train_start(step=155)
    clock.set("10:30:00")
    b.first_step(step=200)
    b.commit(step=200, reason="final", bytes=1, seconds=1.0, created_at=iso("10:29:59"))
    b.exit(code=0)
    assert b.close(10)

    f = compute(read_ledger(store), run_id=RUN)
    assert f["interruptions"] == 1
    assert f["lost_seconds"] == 0 and f["lost_steps"] == 0
    assert f["per_interruption"][0]["saved_step"] == 155
    assert f["recovery_seconds_max"] == (at("10:30:00") - at("10:25:30")).total_seconds()
    assert f["timeline"]["lanes"][0]["lost"] == []
    # Two instances overlap (B up from 10:25:00): instance time counts both, wall once.
    assert f["instance_seconds"] == 1540 + 300 and f["wall_clock_seconds"] == 1800
    assert f["training_seconds"] == (1534 + 209)


def test_a_standby_handoff_and_a_boot_gone_without_a_notice(
    s3_server: LocalS3, bucket: str
) -> None:
    """A trains; a rebalance recommendation (no interruption) brings B up in standby at
    10:21; A's notice at 10:25:00, its interrupt checkpoint (made 10:25:35) committed; B
    takes the slot and trains, then is gone without a notice or an exit after its commit
    of 200 (made 10:40:00, seen 10:40:10); C replaces it. D, a standby, gets a notice
    while waiting: nothing of the run lost there."""
    store = make_store(s3_server.endpoint_url, bucket)
    clock = SetClock()

    def boot(hms: str, hex_id: str, instance: str, uptime: float) -> RunLedger:
        clock.set(hms)
        ledger = RunLedger(store, boot_id=f"20261201T{hms.replace(':', '')}Z-{hex_id}", clock=clock)
        ledger.boot(
            node_id=instance,
            nodes=1,
            uptime_s=uptime,
            price_usd_per_hour=0.4,
            instance=InstanceFacts(instance, "g5.xlarge", "us-east-1a", "spot"),
        )
        return ledger

    def commit(
        ledger: RunLedger, seen: str, step: int, made: str, reason: str = "periodic"
    ) -> None:
        clock.set(seen)
        ledger.commit(step=step, reason=reason, bytes=1, seconds=1.0, created_at=iso(made))

    a = boot("10:00:00", "aaaaaaaaaaaaaaaa", "i-a", 0.0)
    clock.set("10:00:10")
    a.train_start(step=None)
    commit(a, "10:10:05", 100, "10:10:00")
    clock.set("10:20:00")
    a.notice(kind="rebalance", action="rebalance", deadline=None)
    b = boot("10:21:00", "bbbbbbbbbbbbbbbb", "i-b", 30.0)
    clock.set("10:21:05")
    b.restore(step=100, bytes=1, seconds=4.0, downloaded=True)
    clock.set("10:21:10")
    b.standby(holders=["i-a"])
    clock.set("10:25:00")
    a.notice(kind="interruption", action="terminate", deadline=iso("10:27:00"))
    commit(a, "10:25:45", 140, "10:25:35", reason="interrupt")
    clock.set("10:25:50")
    a.stop(reason="notice", committed_step=140)
    a.exit(code=0)
    assert a.close(10)
    clock.set("10:25:52")
    b.slot_taken(slot=0, how="released", handoff_seconds=2.0)
    clock.set("10:25:55")
    b.restore(step=140, bytes=1, seconds=3.0, downloaded=True)
    b.train_start(step=140)
    clock.set("10:30:00")
    b.first_step(step=150)
    commit(b, "10:30:00", 150, "10:29:58")
    commit(b, "10:40:10", 200, "10:40:00")
    assert b.close(10)  # and nothing more: B is gone
    c = boot("10:45:00", "cccccccccccccccc", "i-c", 0.0)
    clock.set("10:45:30")
    c.restore(step=200, bytes=1, seconds=20.0, downloaded=True)
    c.train_start(step=200)
    d = boot("10:46:00", "dddddddddddddddd", "i-d", 0.0)
    clock.set("10:46:10")
    d.standby(holders=["i-c"])
    clock.set("10:47:00")
    d.notice(kind="interruption", action="terminate", deadline=iso("10:49:00"))
    clock.set("10:47:30")
    d.exit(code=0)
    assert d.close(10)
    clock.set("10:50:05")
    c.first_step(step=250)
    commit(c, "10:50:05", 250, "10:50:00", reason="final")
    clock.set("10:50:10")
    c.exit(code=0)
    assert c.close(10)

    f = compute(read_ledger(store), run_id=RUN)
    assert f["boots"] == 4 and f["instances"] == 4
    assert f["interruptions"] == 2 and f["standby_interruptions"] == 1
    handoff, gone = f["per_interruption"]
    assert (handoff["instance_id"], handoff["cause"], handoff["saved_step"]) == (
        "i-a",
        "notice",
        140,
    )
    assert handoff["lost_seconds"] == 0 and handoff["lost_steps"] == 0
    assert handoff["recovery_seconds"] == 300  # 10:25:00 -> B's first step at 10:30:00
    assert handoff["resumed_seconds"] == 55  # -> B's trainer at 10:25:55
    assert (gone["instance_id"], gone["cause"], gone["saved_step"]) == ("i-b", "vanished", 200)
    assert gone["at"] == iso("10:40:10.000") and gone["lost_seconds"] == 10
    assert gone["lost_steps"] == round(10 * 50 / 602)  # B: 150 -> 200 in 602 s
    assert gone["recovery_seconds"] == 595  # -> C's first step at 10:50:05
    assert f["recovery_seconds_mean"] == (300 + 595) / 2 and f["recovery_seconds_max"] == 595
    # A 10:00:10-10:25:35, B 10:25:55-10:40:00 (its standby is not training), C to 10:50:00.
    assert f["training_seconds"] == 1525 + 845 + 270
    # A 1550 s; B from 10:20:30 (30 s uptime) to 10:40:10; C 310 s; D 90 s.
    assert f["instance_seconds"] == 1550 + 1180 + 310 + 90
    assert f["wall_clock_seconds"] == 3010
    assert f["lost_seconds"] == 10
    assert [b["standby"] for b in f["per_boot"]] == [False, True, False, True]
    assert f["per_boot"][1]["handoff_seconds"] == 2.0 and f["per_boot"][1]["vanished"]
    assert any("lower bound" in n for n in f["notes"])
    kinds = [m["kind"] for m in f["timeline"]["markers"]]
    assert kinds.count("notice") == 2 and kinds.count("rebalance") == 1
    assert kinds.count("gone") == 1
    lanes = f["timeline"]["lanes"]
    assert lanes[1]["standby"] == [[iso("10:21:10.000"), iso("10:25:52.000")]]
    assert lanes[3]["standby"] == [[iso("10:46:10.000"), iso("10:47:30.000")]]
