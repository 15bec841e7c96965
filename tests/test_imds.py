"""The IMDSv2 client against the real emulator over HTTP: tokens, connections, failures."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from daemon.notices.imds import (
    INSTANCE_ACTION_PATH,
    INSTANCE_ID_PATH,
    TOKEN_PATH,
    ImdsClient,
    MetadataUnavailable,
    token_refresh_margin,
)
from daemon.standins.emulator import MetadataEmulator


@pytest.fixture
def client(emulator: MetadataEmulator) -> Iterator[ImdsClient]:
    with ImdsClient(emulator.url, connect_timeout=0.5, read_timeout=0.3) as c:
        yield c


def test_one_token_and_one_connection_across_many_polls(
    emulator: MetadataEmulator, client: ImdsClient
) -> None:
    for _ in range(50):
        assert client.get(INSTANCE_ACTION_PATH) == (404, "")
    stats = emulator.stats()
    assert stats.token_puts == 1
    assert stats.count("GET", INSTANCE_ACTION_PATH) == 50
    assert stats.connections == 1
    # One request per poll once the token is cached.
    assert client.stats.requests == 51 and client.stats.token_fetches == 1


def test_404_is_not_present_not_an_error(client: ImdsClient) -> None:
    assert client.get("/latest/meta-data/spot/instance-action") == (404, "")
    assert client.get_text(INSTANCE_ACTION_PATH) is None
    assert client.get_json(INSTANCE_ACTION_PATH) is None
    assert client.stats.failures == 0


def test_items_and_json(emulator: MetadataEmulator, client: ImdsClient) -> None:
    assert client.get(INSTANCE_ID_PATH) == (200, "i-0123456789abcdef0")
    emulator.set_notice("stop")
    doc = client.get_json(INSTANCE_ACTION_PATH)
    assert doc is not None
    assert doc["action"] == "stop" and doc["time"].endswith("Z")


def test_token_refreshed_before_it_expires(emulator: MetadataEmulator) -> None:
    with ImdsClient(emulator.url, token_ttl=1) as client:
        client.get(INSTANCE_ID_PATH)
        client.get(INSTANCE_ID_PATH)
        assert emulator.stats().token_puts == 1
        time.sleep(1.0)  # past ttl - margin (0.9 s)
        assert client.get(INSTANCE_ID_PATH)[0] == 200
    stats = emulator.stats()
    assert stats.token_puts == 2
    # Refreshed ahead of expiry, so no GET was ever refused.
    assert "401" not in stats.responses


def test_failed_early_refresh_keeps_using_the_live_token(emulator: MetadataEmulator) -> None:
    now = [0.0]
    with ImdsClient(emulator.url, token_ttl=100, clock=lambda: now[0]) as client:
        client.get(INSTANCE_ID_PATH)
        # Past the early refresh (at 90 s), the token still has 5 s to live.
        now[0] = 95.0
        emulator.add_fault("status", TOKEN_PATH, status=503)
        assert client.get(INSTANCE_ID_PATH)[0] == 200
        assert emulator.stats().token_puts == 2
        emulator.clear_faults()
        assert client.get(INSTANCE_ID_PATH)[0] == 200
        assert client.stats.token_fetches == 2


def test_refresh_margin() -> None:
    assert token_refresh_margin(21600) == 60
    assert token_refresh_margin(300) == 30
    assert token_refresh_margin(1) == pytest.approx(0.1)


def test_recovers_after_401_with_a_fresh_token(
    emulator: MetadataEmulator, client: ImdsClient
) -> None:
    client.get(INSTANCE_ID_PATH)
    emulator.expire_tokens()  # as after a restart of the service
    assert client.get(INSTANCE_ID_PATH) == (200, "i-0123456789abcdef0")
    stats = emulator.stats()
    assert stats.token_puts == 2
    assert stats.count("GET", INSTANCE_ID_PATH) == 3  # first, refused, retried
    assert stats.responses["401"] == 1


def test_persistent_401_raises(emulator: MetadataEmulator, client: ImdsClient) -> None:
    emulator.add_fault("status", INSTANCE_ID_PATH, status=401)
    with pytest.raises(MetadataUnavailable, match=r"instance-id: HTTP 401") as err:
        client.get(INSTANCE_ID_PATH)
    assert err.value.status == 401
    assert emulator.stats().token_puts == 2  # one fresh token, one retry, no more


def test_never_falls_back_to_imdsv1(emulator: MetadataEmulator, client: ImdsClient) -> None:
    emulator.add_fault("status", TOKEN_PATH, status=403)
    with pytest.raises(MetadataUnavailable, match=r"/latest/api/token: token request got HTTP 403"):
        client.get(INSTANCE_ACTION_PATH)
    # No tokenless GET was tried.
    assert emulator.stats().count("GET", INSTANCE_ACTION_PATH) == 0


@pytest.mark.parametrize(
    ("status", "phrase"),
    [(500, "Internal Server Error"), (503, "Service Unavailable"), (429, "Too Many Requests")],
)
def test_error_statuses_raise(
    emulator: MetadataEmulator, client: ImdsClient, status: int, phrase: str
) -> None:
    client.get(INSTANCE_ACTION_PATH)
    emulator.add_fault("status", INSTANCE_ACTION_PATH, status=status, count=1)
    with pytest.raises(MetadataUnavailable) as err:
        client.get(INSTANCE_ACTION_PATH)
    assert str(err.value) == f"{INSTANCE_ACTION_PATH}: HTTP {status} {phrase}"
    assert err.value.status == status
    # The connection survives an error status; the next poll works on it.
    assert client.get(INSTANCE_ACTION_PATH) == (404, "")
    assert emulator.stats().connections == 1


def test_connection_closed_raises(emulator: MetadataEmulator, client: ImdsClient) -> None:
    client.get(INSTANCE_ACTION_PATH)
    emulator.add_fault("close", INSTANCE_ACTION_PATH)
    with pytest.raises(MetadataUnavailable, match="connection closed without a response") as err:
        client.get(INSTANCE_ACTION_PATH)
    assert err.value.status is None
    emulator.clear_faults()
    assert client.get(INSTANCE_ACTION_PATH) == (404, "")


def test_one_dropped_keepalive_connection_is_retried_quietly(
    emulator: MetadataEmulator, client: ImdsClient
) -> None:
    client.get(INSTANCE_ACTION_PATH)
    # A server closing an idle kept-alive connection looks exactly like this.
    emulator.add_fault("close", INSTANCE_ACTION_PATH, count=1)
    assert client.get(INSTANCE_ACTION_PATH) == (404, "")
    assert emulator.stats().connections == 2
    assert client.stats.failures == 0


def test_hanging_token_put_times_out(emulator: MetadataEmulator, client: ImdsClient) -> None:
    # The hop-limit symptom: the token PUT's answer never arrives.
    emulator.add_fault("delay", TOKEN_PATH, method="PUT", delay_s=5)
    t0 = time.monotonic()
    with pytest.raises(MetadataUnavailable, match=r"/latest/api/token: no response within 0.3 s"):
        client.get(INSTANCE_ACTION_PATH)
    assert time.monotonic() - t0 < 3  # bounded by the read timeout, not the stall
    emulator.clear_faults()
    assert client.get(INSTANCE_ACTION_PATH) == (404, "")


def test_slow_answer_times_out(emulator: MetadataEmulator, client: ImdsClient) -> None:
    client.get(INSTANCE_ACTION_PATH)
    emulator.add_fault("delay", INSTANCE_ACTION_PATH, delay_s=5, count=1)
    with pytest.raises(MetadataUnavailable, match="read timeout"):
        client.get(INSTANCE_ACTION_PATH)
    # A fresh connection afterwards; the stalled one is abandoned, not reused.
    assert client.get(INSTANCE_ACTION_PATH) == (404, "")
    assert emulator.stats().connections == 2


def test_malformed_json_raises(emulator: MetadataEmulator, client: ImdsClient) -> None:
    emulator.add_fault("malformed", INSTANCE_ACTION_PATH, count=1)
    with pytest.raises(MetadataUnavailable, match=r"instance-action: malformed JSON") as err:
        client.get_json(INSTANCE_ACTION_PATH)
    assert err.value.status == 200


def test_connection_refused_raises() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens there now.
    client = ImdsClient(f"http://127.0.0.1:{port}")
    with pytest.raises(MetadataUnavailable, match="refused"):
        client.get(INSTANCE_ACTION_PATH)
    assert client.stats.failures == 1


def test_reconnects_after_the_service_restarts() -> None:
    em = MetadataEmulator().start()
    port = int(em.url.rsplit(":", 1)[1])
    client = ImdsClient(em.url)
    assert client.get(INSTANCE_ID_PATH)[0] == 200
    em.stop()
    with pytest.raises(MetadataUnavailable):
        client.get(INSTANCE_ID_PATH)
    try:
        em2 = MetadataEmulator(port=port).start()
    except OSError:
        pytest.skip("port was taken by someone else meanwhile")
    with em2:
        # A new service knows no old token: 401, fresh token, retry, all inside one get().
        assert client.get(INSTANCE_ID_PATH) == (200, "i-0123456789abcdef0")


@pytest.mark.parametrize(
    ("url", "ttl"),
    [
        ("https://169.254.169.254", 60),
        ("169.254.169.254", 60),
        ("http://x/path", 60),
        ("http://x", 0),
    ],
)
def test_bad_settings_are_rejected(url: str, ttl: int) -> None:
    with pytest.raises(ValueError):
        ImdsClient(url, token_ttl=ttl)
