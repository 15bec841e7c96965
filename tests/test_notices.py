"""Notice sources and the watcher, against the real emulator over HTTP."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.notices import (
    AwsMaintenanceSource,
    AwsRebalanceSource,
    AwsSpotSource,
    Notice,
    parse_event_time,
    parse_iso_utc,
)
from daemon.notices.imds import (
    INSTANCE_ACTION_PATH,
    REBALANCE_PATH,
    SCHEDULED_EVENTS_PATH,
    TOKEN_PATH,
    ImdsClient,
    MetadataUnavailable,
)
from daemon.notices.watch import NoticeWatcher, is_degraded_threshold
from daemon.standins.emulator import MetadataEmulator, scheduled_event

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)
T_0902 = dt.datetime(2026, 11, 28, 9, 2, 0, tzinfo=UTC)


def soon() -> dt.datetime:
    """A notice time ahead of the real clock (the watcher's sources read the real clock)."""
    return dt.datetime.now(UTC).replace(microsecond=0) + dt.timedelta(minutes=2)


def fixed_now() -> dt.datetime:
    return NOW


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition; the bound is generous, only there so a bug fails instead of hanging."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def client(emulator: MetadataEmulator) -> Iterator[ImdsClient]:
    with ImdsClient(emulator.url, read_timeout=0.2) as c:
        yield c


# -- parsing ---------------------------------------------------------------------------


def test_time_parsers() -> None:
    assert parse_iso_utc("2026-11-28T09:02:00Z") == T_0902
    assert parse_iso_utc("2026-11-28T10:02:00+01:00") == T_0902
    assert parse_iso_utc("soon") is None
    assert parse_event_time("21 Jan 2019 09:00:43 GMT") == dt.datetime(
        2019, 1, 21, 9, 0, 43, tzinfo=UTC
    )
    assert parse_event_time("someday") is None


# -- the spot source -------------------------------------------------------------------


def test_spot_source_no_notice(client: ImdsClient) -> None:
    assert AwsSpotSource(client).poll() == []


def test_spot_source_parses_the_notice(emulator: MetadataEmulator, client: ImdsClient) -> None:
    emulator.set_notice("terminate", T_0902)
    [notice] = AwsSpotSource(client, clock=fixed_now).poll()
    assert notice.kind == "interruption"
    assert notice.action == "terminate"
    assert notice.deadline == T_0902
    assert notice.source == "aws-imds"
    assert notice.raw == {"action": "terminate", "time": "2026-11-28T09:02:00Z"}
    assert notice.notice_file_payload() == {
        "action": "terminate",
        "deadline": "2026-11-28T09:02:00Z",
        "source": "aws-imds",
    }


def test_notice_id_is_stable_and_distinct(emulator: MetadataEmulator, client: ImdsClient) -> None:
    source = AwsSpotSource(client, clock=fixed_now)
    emulator.set_notice("terminate", T_0902)
    a, b = source.poll()[0], source.poll()[0]
    assert a.id == b.id and a == b
    emulator.set_notice("terminate", T_0902 + dt.timedelta(minutes=1))
    assert source.poll()[0].id != a.id
    emulator.set_notice("stop", T_0902)
    assert source.poll()[0].id != a.id


def test_hibernate_means_now(emulator: MetadataEmulator, client: ImdsClient) -> None:
    emulator.set_notice("hibernate", T_0902)
    [notice] = AwsSpotSource(client, clock=fixed_now).poll()
    assert notice.action == "hibernate" and notice.deadline == NOW


def test_past_time_means_now(emulator: MetadataEmulator, client: ImdsClient) -> None:
    emulator.set_notice("terminate", NOW - dt.timedelta(minutes=5))
    [notice] = AwsSpotSource(client, clock=fixed_now).poll()
    assert notice.deadline == NOW


def test_unparseable_time_means_now(emulator: MetadataEmulator, client: ImdsClient) -> None:
    emulator.add_fault("malformed", INSTANCE_ACTION_PATH, body='{"action": "stop", "time": "soon"}')
    source = AwsSpotSource(client, clock=fixed_now)
    with capture_logs() as logs:
        [notice] = source.poll()
    assert notice.action == "stop" and notice.deadline == NOW
    assert any(e["event"] == "notice_time_unparseable" for e in logs)
    # Still one notice, however often it is polled.
    assert source.poll()[0].id == notice.id


@pytest.mark.parametrize("body", ['{"action": "terminate", "ti', '["terminate"]', '{"time": "x"}'])
def test_spot_body_that_is_not_a_notice_raises(
    emulator: MetadataEmulator, client: ImdsClient, body: str
) -> None:
    emulator.add_fault("malformed", INSTANCE_ACTION_PATH, body=body)
    with pytest.raises(MetadataUnavailable, match="instance-action"):
        AwsSpotSource(client).poll()


# -- rebalance and maintenance -------------------------------------------------------------


def test_rebalance_source(emulator: MetadataEmulator, client: ImdsClient) -> None:
    source = AwsRebalanceSource(client)
    assert source.poll() == []
    emulator.set_rebalance(NOW)
    [notice] = source.poll()
    assert (notice.kind, notice.action, notice.deadline) == ("rebalance", "rebalance", NOW)
    assert source.poll()[0].id == notice.id


def test_maintenance_source_counts_only_interrupting_live_events(
    emulator: MetadataEmulator, client: ImdsClient
) -> None:
    source = AwsMaintenanceSource(client, clock=fixed_now)
    assert source.poll() == []
    reboot_at = NOW + dt.timedelta(days=2)
    emulator.set_scheduled_events(
        [
            scheduled_event(
                "system-reboot", reboot_at, event_id="instance-event-0d59937288b749b32"
            ),
            scheduled_event("instance-stop", reboot_at, state="completed"),
            scheduled_event("instance-retirement", reboot_at, state="canceled"),
            scheduled_event("system-maintenance", reboot_at),
            scheduled_event("instance-retirement", NOW - dt.timedelta(hours=1)),
        ]
    )
    notices = source.poll()
    assert [(n.kind, n.action, n.deadline) for n in notices] == [
        ("maintenance", "system-reboot", reboot_at),
        ("maintenance", "instance-retirement", NOW),  # already under way: now
    ]
    assert notices[0].raw["EventId"] == "instance-event-0d59937288b749b32"
    assert [n.id for n in source.poll()] == [n.id for n in notices]


def test_maintenance_body_that_is_not_a_list_raises(
    emulator: MetadataEmulator, client: ImdsClient
) -> None:
    emulator.add_fault("malformed", SCHEDULED_EVENTS_PATH, body='{"Code": "system-reboot"}')
    with pytest.raises(MetadataUnavailable, match="not a list"):
        AwsMaintenanceSource(client).poll()


# -- the watcher -----------------------------------------------------------------------------


class Inbox:
    """Collects delivered notices, as the supervisor's queue would."""

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self._lock = threading.Lock()

    def __call__(self, notice: Notice) -> None:
        with self._lock:
            self.notices.append(notice)

    def __len__(self) -> int:
        with self._lock:
            return len(self.notices)


def test_is_degraded_threshold() -> None:
    hits = [n for n in range(1, 2001) if is_degraded_threshold(n)]
    assert hits == [3, 10, 100, 1000]


def test_watcher_delivers_a_notice_once(emulator: MetadataEmulator, client: ImdsClient) -> None:
    inbox = Inbox()
    watcher = NoticeWatcher(
        [AwsSpotSource(client)],
        inbox,
        poll_interval=0.01,
        request_counter=lambda: client.stats.requests,
    )
    with watcher:
        wait_for(lambda: watcher.stats().polls >= 3)
        assert len(inbox) == 0
        emulator.set_notice("terminate", T_0902)
        wait_for(lambda: len(inbox) == 1)
        polls = watcher.stats().polls
        wait_for(lambda: watcher.stats().polls >= polls + 5)  # seen again and again
    assert len(inbox) == 1
    assert inbox.notices[0].action == "terminate"
    assert watcher.last_notice == inbox.notices[0]
    stats = watcher.stats()
    assert stats.notices == 1 and stats.failures == 0
    # One token, then one request per poll.
    assert emulator.stats().token_puts == 1
    assert stats.requests == client.stats.requests == stats.polls + 1


def test_watcher_polls_slow_sources_less_often(
    emulator: MetadataEmulator, client: ImdsClient
) -> None:
    watcher = NoticeWatcher(
        [
            AwsSpotSource(client),
            (AwsRebalanceSource(client), 5),
            (AwsMaintenanceSource(client), 5),
        ],
        Inbox(),
    )
    for _ in range(10):
        watcher.poll_once()
    stats = emulator.stats()
    assert stats.count("GET", INSTANCE_ACTION_PATH) == 10
    assert stats.count("GET", REBALANCE_PATH) == 2
    assert stats.count("GET", SCHEDULED_EVENTS_PATH) == 2
    assert watcher.stats().sources["aws-rebalance"].polls == 2


def test_watcher_delivers_each_kind(emulator: MetadataEmulator, client: ImdsClient) -> None:
    inbox = Inbox()
    watcher = NoticeWatcher(
        [AwsSpotSource(client), AwsRebalanceSource(client), AwsMaintenanceSource(client)], inbox
    )
    emulator.set_rebalance()
    emulator.set_scheduled_events([scheduled_event("instance-stop")])
    emulator.set_notice("stop")
    assert [n.kind for n in watcher.poll_once()] == ["interruption", "rebalance", "maintenance"]
    assert watcher.poll_once() == []
    assert len(inbox) == 3


FAULTS: dict[str, dict[str, Any]] = {
    "500": {"kind": "status", "path_prefix": INSTANCE_ACTION_PATH, "status": 500},
    "503": {"kind": "status", "path_prefix": INSTANCE_ACTION_PATH, "status": 503},
    "429": {"kind": "status", "path_prefix": INSTANCE_ACTION_PATH, "status": 429},
    "closed": {"kind": "close", "path_prefix": INSTANCE_ACTION_PATH},
    "hanging-token-put": {"kind": "delay", "path_prefix": TOKEN_PATH, "delay_s": 5.0},
    "malformed-json": {"kind": "malformed", "path_prefix": INSTANCE_ACTION_PATH},
}
EXPECTED_ERROR = {
    "500": "HTTP 500",
    "503": "HTTP 503",
    "429": "HTTP 429",
    "closed": "connection closed without a response",
    "hanging-token-put": "/latest/api/token: no response within 0.2 s",
    "malformed-json": "malformed JSON",
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_watcher_survives_a_fault_and_later_delivers(
    emulator: MetadataEmulator, client: ImdsClient, fault: str
) -> None:
    inbox = Inbox()
    watcher = NoticeWatcher([AwsSpotSource(client)], inbox, poll_interval=0.01)
    if fault == "hanging-token-put":
        emulator.expire_tokens()  # the client holds none yet; make sure the service agrees
    emulator.add_fault(**FAULTS[fault])
    with capture_logs() as logs, watcher:
        wait_for(lambda: watcher.stats().sources["aws-spot"].consecutive_failures >= 3)
        assert watcher.running
        emulator.clear_faults()
        when = soon()
        emulator.set_notice("terminate", when)
        wait_for(lambda: len(inbox) == 1)
    assert inbox.notices[0].deadline == when
    unavailable = [e for e in logs if e["event"] == "imds_unavailable"]
    assert unavailable and EXPECTED_ERROR[fault] in unavailable[0]["error"]
    assert [e["count"] for e in unavailable[:3]] == [1, 2, 3]
    degraded = [e for e in logs if e["event"] == "imds_degraded"]
    assert degraded[0]["count"] == 3 and degraded[0]["log_level"] == "warning"
    recovered = [e for e in logs if e["event"] == "imds_recovered"]
    assert len(recovered) == 1 and recovered[0]["after_failures"] >= 3
    assert [e["event"] for e in logs].count("notice_received") == 1
    stats = watcher.stats()
    assert stats.failures >= 3 and stats.sources["aws-spot"].consecutive_failures == 0


def test_watcher_survives_a_failing_callback(
    emulator: MetadataEmulator, client: ImdsClient
) -> None:
    calls: list[Notice] = []

    def explode(notice: Notice) -> None:
        calls.append(notice)
        raise RuntimeError("callback bug")

    watcher = NoticeWatcher([AwsSpotSource(client)], explode, poll_interval=0.01)
    emulator.set_notice("terminate")
    with capture_logs() as logs, watcher:
        wait_for(lambda: watcher.stats().polls >= 5)
        assert watcher.running
    assert len(calls) == 1
    assert any(e["event"] == "notice_callback_failed" for e in logs)


def test_watcher_stop_is_prompt(client: ImdsClient) -> None:
    watcher = NoticeWatcher([AwsSpotSource(client)], Inbox(), poll_interval=60).start()
    wait_for(lambda: watcher.stats().polls == 1)
    t0 = time.monotonic()
    watcher.stop()
    assert time.monotonic() - t0 < 2  # woken from its 60 s wait, not slept through
    assert not watcher.running


def test_watcher_rejects_bad_settings(client: ImdsClient) -> None:
    with pytest.raises(ValueError):
        NoticeWatcher([AwsSpotSource(client)], Inbox(), poll_interval=0)
    with pytest.raises(ValueError):
        NoticeWatcher([(AwsSpotSource(client), 0)], Inbox())
    with pytest.raises(ValueError):
        NoticeWatcher([AwsSpotSource(client), AwsSpotSource(client)], Inbox())
