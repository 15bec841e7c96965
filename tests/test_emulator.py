"""The metadata emulator answers as AWS documents IMDSv2, over real HTTP on loopback."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from daemon.notices.imds import (
    AVAILABILITY_ZONE_PATH,
    INSTANCE_ACTION_PATH,
    INSTANCE_ID_PATH,
    REBALANCE_PATH,
    REGION_PATH,
    SCHEDULED_EVENTS_PATH,
    TERMINATION_TIME_PATH,
    TOKEN_HEADER,
    TOKEN_PATH,
    TOKEN_TTL_HEADER,
)
from daemon.standins.emulator import (
    CONTROL_FAULT_PATH,
    CONTROL_NOTICE_PATH,
    EmulatorControl,
    MetadataEmulator,
    format_event_time,
    scheduled_event,
)

UTC = dt.timezone.utc


@pytest.fixture
def emulator() -> Iterator[MetadataEmulator]:
    with MetadataEmulator() as em:
        yield em


class Http:
    """A bare HTTP client, one connection, no IMDS logic: what the wire says."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)

    def __call__(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, dict[str, str], str]:
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        text = resp.read().decode()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, text

    def token(self, ttl: int = 21600) -> str:
        status, _, body = self("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(ttl)})
        assert status == 200
        return body

    def get(self, path: str, token: str) -> tuple[int, str]:
        status, _, body = self("GET", path, {TOKEN_HEADER: token})
        return status, body


@pytest.fixture
def wire(emulator: MetadataEmulator) -> Iterator[Http]:
    h = Http(emulator.url)
    yield h
    h.conn.close()


# -- the token ---------------------------------------------------------------------------


def test_token_put_returns_opaque_token_and_echoes_ttl(wire: Http) -> None:
    status, headers, body = wire("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: "300"})
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert headers[TOKEN_TTL_HEADER.lower()] == "300"
    assert len(body) >= 32 and body.strip() == body


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-1", "abc", ""])
def test_token_put_without_a_valid_ttl_is_400(wire: Http, ttl: str | None) -> None:
    headers = {} if ttl is None else {TOKEN_TTL_HEADER: ttl}
    status, _, _ = wire("PUT", TOKEN_PATH, headers)
    assert status == 400


@pytest.mark.parametrize("ttl", ["1", "21600"])
def test_token_ttl_bounds_are_accepted(wire: Http, ttl: str) -> None:
    status, _, _ = wire("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: ttl})
    assert status == 200


def test_token_put_through_a_proxy_is_403(wire: Http) -> None:
    status, _, _ = wire(
        "PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: "60", "X-Forwarded-For": "203.0.113.7"}
    )
    assert status == 403


def test_token_path_only_takes_put(wire: Http) -> None:
    status, headers, _ = wire("GET", TOKEN_PATH)
    assert status == 405 and headers["allow"] == "PUT"


def test_get_without_a_token_is_401_never_v1(wire: Http) -> None:
    assert wire("GET", INSTANCE_ID_PATH)[0] == 401
    assert wire.get(INSTANCE_ID_PATH, "not-a-token")[0] == 401


def test_token_expires_after_its_ttl(wire: Http) -> None:
    import time

    token = wire.token(ttl=1)
    assert wire.get(INSTANCE_ID_PATH, token) == (200, "i-0123456789abcdef0")
    time.sleep(1.1)
    assert wire.get(INSTANCE_ID_PATH, token)[0] == 401


def test_expire_tokens_forgets_every_token(emulator: MetadataEmulator, wire: Http) -> None:
    token = wire.token()
    emulator.expire_tokens()
    assert wire.get(INSTANCE_ID_PATH, token)[0] == 401


# -- the metadata ------------------------------------------------------------------------


def test_instance_items(wire: Http) -> None:
    token = wire.token()
    assert wire.get(INSTANCE_ID_PATH, token) == (200, "i-0123456789abcdef0")
    assert wire.get(REGION_PATH, token) == (200, "us-east-1")
    assert wire.get(AVAILABILITY_ZONE_PATH, token) == (200, "us-east-1a")
    assert wire.get("/latest/meta-data/no-such-item", token)[0] == 404
    status, listing = wire.get("/latest/meta-data/", token)
    assert status == 200 and "instance-id" in listing.splitlines()


def test_instance_action_404_until_notice_then_documented_body(
    emulator: MetadataEmulator, wire: Http
) -> None:
    token = wire.token()
    # 404 is the normal answer: no notice yet.
    assert wire.get(INSTANCE_ACTION_PATH, token)[0] == 404
    assert wire.get(TERMINATION_TIME_PATH, token)[0] == 404
    emulator.set_notice("terminate", dt.datetime(2026, 11, 28, 9, 2, tzinfo=UTC))
    # Byte for byte the form of AWS's documented example.
    assert wire.get(INSTANCE_ACTION_PATH, token) == (
        200,
        '{"action": "terminate", "time": "2026-11-28T09:02:00Z"}',
    )
    assert wire.get(TERMINATION_TIME_PATH, token) == (200, "2026-11-28T09:02:00Z")
    emulator.clear_notice()
    assert wire.get(INSTANCE_ACTION_PATH, token)[0] == 404
    assert wire.get(TERMINATION_TIME_PATH, token)[0] == 404


def test_stop_notice_has_no_termination_time(emulator: MetadataEmulator, wire: Http) -> None:
    token = wire.token()
    emulator.set_notice("stop", dt.datetime(2026, 11, 28, 9, 2, tzinfo=UTC))
    assert json.loads(wire.get(INSTANCE_ACTION_PATH, token)[1])["action"] == "stop"
    assert wire.get(TERMINATION_TIME_PATH, token)[0] == 404


def test_default_notice_times(emulator: MetadataEmulator) -> None:
    now = dt.datetime.now(UTC)
    t = emulator.set_notice("terminate")
    assert dt.timedelta(seconds=118) <= t - now <= dt.timedelta(seconds=122)
    # Hibernation starts at once: no two-minute warning.
    t = emulator.set_notice("hibernate")
    assert abs((t - now).total_seconds()) < 2
    with pytest.raises(ValueError):
        emulator.set_notice("explode")


def test_rebalance_recommendation(emulator: MetadataEmulator, wire: Http) -> None:
    token = wire.token()
    assert wire.get(REBALANCE_PATH, token)[0] == 404
    emulator.set_rebalance(dt.datetime(2026, 11, 28, 9, 0, tzinfo=UTC))
    assert wire.get(REBALANCE_PATH, token) == (200, '{"noticeTime": "2026-11-28T09:00:00Z"}')


def test_scheduled_events(emulator: MetadataEmulator, wire: Http) -> None:
    token = wire.token()
    assert wire.get(SCHEDULED_EVENTS_PATH, token) == (200, "[]")
    start = dt.datetime(2019, 1, 21, 9, 0, 43, tzinfo=UTC)
    event = scheduled_event("system-reboot", start, event_id="instance-event-0d59937288b749b32")
    emulator.set_scheduled_events([event])
    status, body = wire.get(SCHEDULED_EVENTS_PATH, token)
    assert status == 200
    [served] = json.loads(body)
    assert served == event
    assert served["NotBefore"] == "21 Jan 2019 09:00:43 GMT"
    assert served["NotAfter"] == "21 Jan 2019 11:00:43 GMT"
    assert set(served) == {"NotBefore", "Code", "Description", "EventId", "NotAfter", "State"}


def test_event_time_format_is_not_locale_dependent() -> None:
    assert (
        format_event_time(dt.datetime(2026, 3, 5, 7, 8, 9, tzinfo=UTC)) == "5 Mar 2026 07:08:09 GMT"
    )


# -- faults and counters -----------------------------------------------------------------


def test_status_fault_for_the_next_n_requests(emulator: MetadataEmulator, wire: Http) -> None:
    token = wire.token()
    emulator.add_fault("status", INSTANCE_ID_PATH, status=503, count=2)
    assert wire.get(INSTANCE_ID_PATH, token)[0] == 503
    assert wire.get(INSTANCE_ID_PATH, token)[0] == 503
    assert wire.get(INSTANCE_ID_PATH, token)[0] == 200
    assert emulator.stats().faults_applied == 2


def test_malformed_fault_serves_a_broken_body(emulator: MetadataEmulator, wire: Http) -> None:
    token = wire.token()
    emulator.add_fault("malformed", INSTANCE_ACTION_PATH, count=1)
    status, body = wire.get(INSTANCE_ACTION_PATH, token)
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)


def test_close_fault_hangs_up_without_answering(emulator: MetadataEmulator, wire: Http) -> None:
    token = wire.token()
    emulator.add_fault("close", INSTANCE_ID_PATH, count=1)
    with pytest.raises(http.client.RemoteDisconnected):
        wire.get(INSTANCE_ID_PATH, token)


def test_delay_fault_stalls_then_answers(emulator: MetadataEmulator, wire: Http) -> None:
    import time

    emulator.add_fault("delay", TOKEN_PATH, method="PUT", delay_s=0.3, count=1)
    t0 = time.monotonic()
    wire.token()
    assert time.monotonic() - t0 >= 0.25


def test_fault_validation() -> None:
    with MetadataEmulator() as em:
        for bad in (
            {"kind": "explode"},
            {"kind": "status", "count": 0},
            {"kind": "status", "status": 7},
        ):
            with pytest.raises(ValueError):
                em.add_fault(**bad)


def test_stats_count_requests_tokens_and_connections(
    emulator: MetadataEmulator, wire: Http
) -> None:
    token = wire.token()
    for _ in range(3):
        wire.get(INSTANCE_ACTION_PATH, token)
    stats = emulator.stats()
    assert stats.token_puts == 1 and stats.tokens_issued == 1
    assert stats.count("GET", INSTANCE_ACTION_PATH) == 3
    assert stats.total == 4
    assert stats.connections == 1  # HTTP/1.1 keep-alive: one connection for all
    assert stats.responses == {"200": 1, "404": 3}
    emulator.reset_stats()
    assert emulator.stats().total == 0


def test_stop_hangs_up_kept_alive_connections() -> None:
    em = MetadataEmulator().start()
    wire = Http(em.url)
    wire.token()
    em.stop()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        wire.token()


# -- control over HTTP -------------------------------------------------------------------


def test_control_api_over_http(emulator: MetadataEmulator, wire: Http) -> None:
    ctl = EmulatorControl(emulator.url)
    token = wire.token()
    t = ctl.set_notice("stop", time="2026-11-28T09:02:00Z")
    assert t == "2026-11-28T09:02:00Z"
    assert wire.get(INSTANCE_ACTION_PATH, token) == (
        200,
        '{"action": "stop", "time": "2026-11-28T09:02:00Z"}',
    )
    ctl.set_notice("terminate", in_seconds=60)
    ctl.clear_notice()
    assert wire.get(INSTANCE_ACTION_PATH, token)[0] == 404
    ctl.set_rebalance("2026-11-28T09:00:00Z")
    assert wire.get(REBALANCE_PATH, token)[1] == '{"noticeTime": "2026-11-28T09:00:00Z"}'
    ctl.set_scheduled_events([scheduled_event("instance-stop")])
    assert json.loads(wire.get(SCHEDULED_EVENTS_PATH, token)[1])[0]["Code"] == "instance-stop"
    ctl.add_fault("status", INSTANCE_ID_PATH, status=429, count=1)
    assert wire.get(INSTANCE_ID_PATH, token)[0] == 429
    ctl.add_fault("status", INSTANCE_ID_PATH, status=500)
    ctl.clear_faults()
    assert wire.get(INSTANCE_ID_PATH, token)[0] == 200
    ctl.expire_tokens()
    assert wire.get(INSTANCE_ID_PATH, token)[0] == 401
    stats = ctl.stats()
    # Control requests are not counted: the counters describe the metadata traffic.
    assert stats.token_puts == 1
    assert stats.count("GET", INSTANCE_ID_PATH) == 3
    ctl.reset_stats()
    assert ctl.stats().total == 0


def test_control_api_rejects_bad_requests(wire: Http) -> None:
    status, _, body = wire("POST", CONTROL_NOTICE_PATH, {}, b"{not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]
    status, _, _ = wire("POST", CONTROL_NOTICE_PATH, {}, b'{"action": "explode"}')
    assert status == 400
    status, _, body = wire("POST", CONTROL_FAULT_PATH, {}, b'{"kind": "status", "colour": 1}')
    assert status == 400 and "colour" in json.loads(body)["error"]
    status, _, _ = wire("GET", "/_emulator/nothing")
    assert status == 404


def test_standalone_process_prints_its_url_and_is_driven_over_http() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.standins.emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        ctl = EmulatorControl(url)
        ctl.set_notice("terminate", time="2026-11-28T09:02:00Z")
        wire = Http(url)
        assert wire.get(INSTANCE_ACTION_PATH, wire.token())[1] == (
            '{"action": "terminate", "time": "2026-11-28T09:02:00Z"}'
        )
        wire.conn.close()
        assert ctl.stats().token_puts == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
