"""The run ledger (daemon/ledger.py): one object per boot, best effort, never in the way.

Every test writes through the daemon's own store to moto's S3 server over HTTP (through
the fault-injecting proxy where a test needs to see or break the requests); the
metadata comes from the IMDSv2 emulator over HTTP. Nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from daemon.ledger import (
    InstanceFacts,
    RunLedger,
    ledger_prefix,
    new_boot_id,
    parse_time,
    read_ledger,
    segment_key,
)
from daemon.notices.imds import ImdsClient
from daemon.standins import LocalS3
from daemon.standins.emulator import MetadataEmulator
from daemon.standins.faultproxy import FaultProxy
from daemon.storage.s3client import RemoteLocation, make_s3_client
from daemon.storage.store import CheckpointStore

RUN = "ledger-run"
PREFIX = "runs"


def make_store(
    endpoint: str, bucket: str, *, max_attempts: int = 2, read_timeout: float = 20.0
) -> CheckpointStore:
    client = make_s3_client(
        endpoint, "us-east-1", max_attempts=max_attempts, read_timeout=read_timeout
    )
    return CheckpointStore(client, RemoteLocation(bucket, PREFIX), RUN)


def lines_of(s3_client: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return [json.loads(line) for line in body.decode().splitlines()]


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def warnings_named(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


@pytest.fixture(autouse=True)
def default_logging() -> Iterator[None]:
    """structlog as a fresh process has it (other tests' commands configure it: a level
    filter would hide the info events checked here); restored afterwards."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


@pytest.fixture
def proxy(s3_server: LocalS3) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, seed=17) as p:
        yield p


def test_records_appear_in_the_boot_object(
    s3_server: LocalS3, s3_client: Any, bucket: str, emulator: MetadataEmulator
) -> None:
    store = make_store(s3_server.endpoint_url, bucket)
    ledger = RunLedger(store)
    with ImdsClient(emulator.url) as imds:
        ledger.boot(node_id="node-a", nodes=2, slot=1, metadata=imds, price_usd_per_hour=0.31)
        ledger.restore(step=200, bytes=4096, seconds=1.25, downloaded=True)
        ledger.train_start(step=200)
        ledger.first_step(step=300)
        ledger.commit(
            step=300, reason="periodic", bytes=4096, seconds=0.5, created_at="2026-12-01T10:00:00Z"
        )
        ledger.notice(
            kind="interruption",
            action="terminate",
            deadline=dt.datetime(2026, 12, 1, 10, 2, tzinfo=dt.timezone.utc),
        )
        ledger.stop(reason="notice", committed_step=300)
        ledger.exit(code=0)
        assert ledger.close(10)

    assert ledger.key == f"{PREFIX}/{RUN}/ledger/{ledger.boot_id}.jsonl"
    lines = lines_of(s3_client, bucket, ledger.key)
    assert [d["event"] for d in lines] == [
        "boot",
        "restore",
        "train_start",
        "first_step",
        "commit",
        "notice",
        "stop",
        "exit",
    ]
    boot = lines[0]
    # The emulator's machine, read on the ledger's thread.
    assert boot["instance_id"] == "i-0123456789abcdef0"
    assert boot["instance_type"] == "g5.xlarge"
    assert boot["availability_zone"] == "us-east-1a"
    assert boot["lifecycle"] == "spot"
    assert (boot["node_id"], boot["nodes"], boot["slot"]) == ("node-a", 2, 1)
    assert boot["price_usd_per_hour"] == 0.31
    assert boot["boot_id"] == ledger.boot_id and boot["run_id"] == RUN
    assert isinstance(boot["host_uptime_s"], float) and boot["host_uptime_s"] > 0
    assert lines[1] == {**lines[1], "step": 200, "bytes": 4096, "seconds": 1.25, "downloaded": True}
    assert lines[4]["created_at"] == "2026-12-01T10:00:00Z" and lines[4]["reason"] == "periodic"
    assert lines[5]["deadline"] == "2026-12-01T10:02:00.000Z"
    assert lines[6] == {**lines[6], "reason": "notice", "committed_step": 300}
    assert lines[7]["code"] == 0
    for d in lines:  # every line: ISO UTC with milliseconds, in order
        assert len(d["t"]) == len("2026-12-01T10:00:00.000Z") and d["t"].endswith("Z")
    times = [parse_time(d["t"]) for d in lines]
    assert times == sorted(times)

    (read,) = read_ledger(store)
    assert read.boot_id == ledger.boot_id and read.events[0].name == "boot"
    assert read.info["instance_type"] == "g5.xlarge" and read.exited


def test_flush_rewrites_the_whole_object_and_record_never_waits(
    s3_server: LocalS3, s3_client: Any, bucket: str
) -> None:
    store = make_store(s3_server.endpoint_url, bucket)
    ledger = RunLedger(store)
    ledger.boot(node_id="n", nodes=1, instance=InstanceFacts("i-1", "g5.xlarge", None, "spot"))
    assert ledger.flush(10)
    assert [d["event"] for d in lines_of(s3_client, bucket, ledger.key)] == ["boot"]
    started = time.monotonic()
    for step in range(10, 60, 10):
        ledger.commit(step=step, reason="periodic", bytes=1, seconds=0.1)
    assert time.monotonic() - started < 0.05  # in memory only; the PUTs are the thread's
    assert ledger.flush(10)
    lines = lines_of(s3_client, bucket, ledger.key)
    assert [d.get("step") for d in lines] == [None, 10, 20, 30, 40, 50]
    assert lines[0]["availability_zone"] is None  # unknown stays null
    assert ledger.close(10)
    ledger.commit(step=60, reason="periodic", bytes=1, seconds=0.1)  # after close: dropped
    assert len(lines_of(s3_client, bucket, ledger.key)) == 6


def test_one_boot_never_touches_another_boots_object(
    s3_server: LocalS3, s3_client: Any, bucket: str, proxy: FaultProxy
) -> None:
    direct = make_store(s3_server.endpoint_url, bucket)
    first = RunLedger(direct, boot_id="20261201T100000Z-aaaaaaaaaaaaaaaa")
    first.boot(node_id="a", nodes=1, instance=InstanceFacts("i-a"))
    first.exit(code=0)
    assert first.close(10)
    before = s3_client.get_object(Bucket=bucket, Key=first.key)
    body_before = before["Body"].read()

    second = RunLedger(make_store(proxy.url, bucket), boot_id="20261201T110000Z-bbbbbbbbbbbbbbbb")
    second.boot(node_id="b", nodes=1, instance=InstanceFacts("i-b"))
    for step in (1, 2, 3):
        second.commit(step=step, reason="periodic", bytes=1, seconds=0.1)
        assert second.flush(10)
    second.exit(code=0)
    assert second.close(10)

    assert proxy.wait_idle(10)
    targets = {r.target.split("?")[0] for r in proxy.records()}
    # Every request the second boot made was a write of its own object; nothing else.
    assert targets == {f"/{bucket}/{second.key}"}
    assert {r.method for r in proxy.records()} == {"PUT"}
    after = s3_client.get_object(Bucket=bucket, Key=first.key)
    assert after["Body"].read() == body_before and after["ETag"] == before["ETag"]
    boots = read_ledger(direct)
    assert [b.boot_id for b in boots] == [first.boot_id, second.boot_id]
    assert [b.info["instance_id"] for b in boots] == ["i-a", "i-b"]


def test_a_bucket_that_does_not_exist_never_raises_and_is_logged_once(
    s3_server: LocalS3, bucket: str
) -> None:
    store = make_store(s3_server.endpoint_url, bucket + "-gone")
    with capture_logs() as logs:
        ledger = RunLedger(store)
        ledger.boot(node_id="n", nodes=1, instance=InstanceFacts("i-1"))
        assert ledger.flush(10) is False  # the write made for it failed: no waiting on
        for step in range(5):
            ledger.commit(step=step, reason="periodic", bytes=1, seconds=0.1)
            assert ledger.flush(10) is False
        ledger.exit(code=0)
        started = time.monotonic()
        assert ledger.close(10) is False
        assert time.monotonic() - started < 5
    failed = warnings_named(logs, "ledger_write_failed")
    assert len(failed) == 1, logs
    assert failed[0]["log_level"] == "warning"
    assert "NoSuchBucket" in failed[0]["error"] or "does not exist" in failed[0]["error"]


def test_an_endpoint_that_refuses_connections_never_raises_and_close_is_bounded() -> None:
    store = make_store(f"http://127.0.0.1:{closed_port()}", "no-such-server", max_attempts=5)
    with capture_logs() as logs:
        ledger = RunLedger(store)
        ledger.boot(node_id="n", nodes=1, instance=InstanceFacts("i-1"))
        for step in range(20):
            ledger.commit(step=step, reason="periodic", bytes=1, seconds=0.1)
        ledger.exit(code=1)
        started = time.monotonic()
        ok = ledger.close(1.5)
        took = time.monotonic() - started
    assert ok is False
    # botocore's five attempts with backoff take longer than that: close stops waiting.
    assert took < 2.0
    assert len(warnings_named(logs, "ledger_write_failed")) <= 1


def test_close_returns_within_its_timeout_while_s3_hangs(
    s3_server: LocalS3, s3_client: Any, bucket: str, proxy: FaultProxy
) -> None:
    """A PUT whose answer never comes (the proxy holds it 30 s; the client would wait
    20 s): record stays instant, flush and close return at their timeouts."""
    store = make_store(proxy.url, bucket, max_attempts=1)
    ledger = RunLedger(store)
    proxy.stall(30.0, method="PUT", path=r"/ledger/")
    ledger.boot(node_id="n", nodes=1, instance=InstanceFacts("i-1"))
    time.sleep(0.3)  # the thread's PUT is now held by the proxy
    started = time.monotonic()
    for step in range(10):
        ledger.commit(step=step, reason="interrupt", bytes=1, seconds=0.1)
    assert time.monotonic() - started < 0.05
    started = time.monotonic()
    assert ledger.flush(0.5) is False
    ledger.exit(code=0)
    assert ledger.close(1.0) is False
    took = time.monotonic() - started
    assert 1.4 <= took < 2.5, took
    proxy.clear()


def test_a_stalled_write_is_retried_and_the_ledger_catches_up(
    s3_server: LocalS3, s3_client: Any, bucket: str, proxy: FaultProxy
) -> None:
    """The first PUT stalls past the client's read timeout: the next write carries every
    line, and the failure and the recovery are logged once each."""
    store = make_store(proxy.url, bucket, max_attempts=1, read_timeout=0.5)
    proxy.stall(2.0, method="PUT", path=r"/ledger/", count=1)
    with capture_logs() as logs:
        ledger = RunLedger(store)
        ledger.boot(node_id="n", nodes=1, instance=InstanceFacts("i-1"))
        ledger.commit(step=1, reason="periodic", bytes=1, seconds=0.1)
        time.sleep(1.0)  # the first PUT has timed out (0.5 s); its retry waits 1 s
        ledger.commit(step=2, reason="periodic", bytes=1, seconds=0.1)
        assert ledger.flush(5) is True  # a flush does not wait out the backoff
        assert ledger.close(5)
    assert [d.get("step") for d in lines_of(s3_client, bucket, ledger.key)] == [None, 1, 2]
    assert len(warnings_named(logs, "ledger_write_failed")) == 1
    assert len(warnings_named(logs, "ledger_write_recovered")) == 1


def test_a_log_that_raises_never_reaches_the_caller_or_stops_the_writer(
    s3_server: LocalS3, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """Late in a shutdown stdout can be gone: logging then raises. The ledger's own log
    calls swallow that, in record() and on its thread."""
    closed = (tmp_path / "log").open("w")
    closed.close()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=closed))
    failing = RunLedger(make_store(s3_server.endpoint_url, bucket + "-gone"))
    failing.commit(step=1, reason="periodic", bytes=1, seconds=0.1)
    assert failing.flush(5) is False  # failed, and its warning could not be written
    assert failing._thread.is_alive()
    ledger = RunLedger(make_store(s3_server.endpoint_url, bucket))
    loop: dict[str, Any] = {}
    loop["self"] = loop
    ledger.record("commit", step=1, odd=loop)  # json cannot take it: dropped, not raised
    ledger.commit(step=2, reason="periodic", bytes=1, seconds=0.1)
    assert ledger.close(10)
    assert [d["step"] for d in lines_of(s3_client, bucket, ledger.key)] == [2]
    failing.close(0.1)


def test_boot_metadata_that_cannot_be_read_is_null_and_never_blocks(
    s3_server: LocalS3, s3_client: Any, bucket: str
) -> None:
    store = make_store(s3_server.endpoint_url, bucket)
    ledger = RunLedger(store)
    imds = ImdsClient(f"http://127.0.0.1:{closed_port()}", connect_timeout=0.2, read_timeout=0.2)
    started = time.monotonic()
    ledger.boot(node_id="n", nodes=1, metadata=imds, uptime_s=12.5)
    assert time.monotonic() - started < 0.05  # the lookups are the ledger thread's
    assert ledger.close(10)
    imds.close()
    (boot,) = lines_of(s3_client, bucket, ledger.key)
    assert boot["event"] == "boot" and boot["host_uptime_s"] == 12.5
    for key in ("instance_id", "instance_type", "availability_zone", "lifecycle"):
        assert key in boot and boot[key] is None


def test_a_long_boot_rolls_over_into_segments_read_back_in_order(
    s3_server: LocalS3, s3_client: Any, bucket: str
) -> None:
    store = make_store(s3_server.endpoint_url, bucket)
    ledger = RunLedger(store, max_segment_bytes=400)
    ledger.boot(node_id="n", nodes=1, instance=InstanceFacts("i-1"))
    for step in range(1, 31):
        ledger.commit(step=step, reason="periodic", bytes=step, seconds=0.1)
        if step % 7 == 0:
            assert ledger.flush(10)
    ledger.exit(code=0)
    assert ledger.close(10)
    keys = sorted(
        o["Key"]
        for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=ledger_prefix(store))["Contents"]
    )
    assert len(keys) > 3 and segment_key(store, ledger.boot_id, 1) in keys
    assert all(o["Size"] <= 400 for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    (boot,) = read_ledger(store)
    assert [e.get("step") for e in boot.all("commit")] == list(range(1, 31))
    assert boot.events[0].name == "boot" and boot.events[-1].name == "exit"
    assert len(boot.keys) == len(keys)


def test_read_ledger_skips_garbage_lines_with_one_warning(
    s3_server: LocalS3, s3_client: Any, bucket: str
) -> None:
    store = make_store(s3_server.endpoint_url, bucket)
    prefix = ledger_prefix(store)
    good = '{"t":"2026-12-01T10:00:00.000Z","event":"boot","instance_id":"i-1"}'
    body = "\n".join(
        [
            good,
            "not json at all",
            "[1, 2, 3]",
            '{"event": "commit", "step": 5}',  # no time
            '{"t": "yesterday", "event": "commit"}',
            '{"t":"2026-12-01T10:05:00Z","event":"commit","step":5}',
            "",
            "\x00\xff garbage",
        ]
    ).encode("utf-8", errors="surrogateescape")
    s3_client.put_object(
        Bucket=bucket, Key=prefix + "20261201T100000Z-0123456789abcdef.jsonl", Body=body
    )
    s3_client.put_object(Bucket=bucket, Key=prefix + "notes.txt", Body=b"not a ledger object")
    s3_client.put_object(
        Bucket=bucket,
        Key=prefix + "20261201T090000Z-fedcba9876543210.jsonl",
        Body=b'{"t":"2026-12-01T09:00:00Z","event":"boot"}\n{"t":"2026-12-01T09:01:00Z","event":"exit","code":0}\n',
    )
    with capture_logs() as logs:
        boots = read_ledger(store)
    assert [b.boot_id for b in boots] == [
        "20261201T090000Z-fedcba9876543210",
        "20261201T100000Z-0123456789abcdef",
    ]
    later = boots[1]
    assert [(e.name, e.get("step")) for e in later.events] == [("boot", None), ("commit", 5)]
    assert later.skipped_lines == 5
    skipped = warnings_named(logs, "ledger_lines_skipped")
    assert len(skipped) == 1 and skipped[0]["skipped"] == 5
    assert later.events[1].t == dt.datetime(2026, 12, 1, 10, 5, tzinfo=dt.timezone.utc)


def test_boot_ids_sort_by_start_time_and_are_unique() -> None:
    early = dt.datetime(2026, 12, 1, 9, 59, 59, tzinfo=dt.timezone.utc)
    late = dt.datetime(2026, 12, 1, 10, 0, 0, tzinfo=dt.timezone.utc)
    ids = [new_boot_id(late) for _ in range(50)] + [new_boot_id(early)]
    assert len(set(ids)) == len(ids)
    assert sorted(ids)[0] == ids[-1] and ids[-1].startswith("20261201T095959Z-")
    with pytest.raises(ValueError):
        RunLedger(make_store("http://127.0.0.1:9", "b-1"), boot_id="../other-boot")
