"""The fault-injecting proxy itself: passthrough, framing, 100-continue, each fault, control.

These tests put it in front of a tiny stdlib HTTP/1.1 server whose framing we choose
(chunked, Content-Length, until close) and whose view of request bodies we can read;
tests/test_faultproxy_boto3.py puts it in front of moto, with boto3 as the client.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from daemon.standins.faultproxy import (
    CONTROL_RULES_PATH,
    CONTROL_STATS_PATH,
    FaultProxy,
    Rule,
    Shaping,
)

BODY = bytes(range(256)) * 800  # 204 800 bytes, every offset's value known


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received: list[bytes]  # request bodies, set on the subclass per server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(BODY), 50_000):
                piece = BODY[i : i + 50_000]
                self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/until-close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BODY)
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()

    def do_PUT(self) -> None:
        body = self._read_body()
        self.received.append(body)
        reply = hashlib.sha256(body).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@pytest.fixture
def upstream() -> Iterator[tuple[str, list[bytes]]]:
    """A stdlib HTTP/1.1 server on loopback; its URL and the request bodies it received."""
    received: list[bytes] = []
    handler = type("Handler", (_Handler,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()
    t.join(5)


@pytest.fixture
def proxy(upstream: tuple[str, list[bytes]]) -> Iterator[FaultProxy]:
    with FaultProxy(upstream[0], seed=7) as p:
        yield p


def conn(p: FaultProxy, timeout: float = 10.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", p.port, timeout=timeout)


def get(p: FaultProxy, path: str = "/plain") -> tuple[int, bytes]:
    c = conn(p)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def faultproxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("faultproxy")]


# -- passthrough ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/plain", "/chunked", "/until-close"])
def test_response_framings_pass_through(proxy: FaultProxy, path: str) -> None:
    assert get(proxy, path) == (200, BODY)
    assert proxy.stats().bytes_down == len(BODY)


def test_keep_alive_on_the_client_side(proxy: FaultProxy) -> None:
    c = conn(proxy)
    for path in ("/plain", "/chunked", "/plain"):
        c.request("GET", path)
        r = c.getresponse()
        assert r.read() == BODY
        assert r.getheader("Connection") == "keep-alive"
    c.request("HEAD", "/plain")
    r = c.getresponse()
    assert (r.status, r.read(), r.getheader("Content-Length")) == (200, b"", str(len(BODY)))
    c.close()
    stats = proxy.stats()
    assert (stats.connections, stats.requests, stats.forwarded) == (1, 4, 4)


def test_chunked_request_body_passes_through(
    proxy: FaultProxy, upstream: tuple[str, list[bytes]]
) -> None:
    c = conn(proxy)
    pieces = [BODY[i : i + 30_000] for i in range(0, len(BODY), 30_000)]
    c.request("PUT", "/obj", body=iter(pieces), encode_chunked=True)
    r = c.getresponse()
    assert r.read() == hashlib.sha256(BODY).hexdigest().encode()
    assert upstream[1] == [BODY]
    c.close()


def test_expect_100_continue_is_answered_by_the_proxy(
    proxy: FaultProxy, upstream: tuple[str, list[bytes]]
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(
            b"PUT /obj HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY)
        )
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(BODY)
        reply = b""
        while not reply.endswith(hashlib.sha256(BODY).hexdigest().encode()):
            data = s.recv(65536)
            assert data
            reply += data
    assert reply.startswith(b"HTTP/1.1 200")
    assert upstream[1] == [BODY]
    # Never passed upstream: the proxy owns the handshake.
    assert "expect" in proxy.records()[0].headers


def test_expect_100_continue_ignored_on_request(upstream: tuple[str, list[bytes]]) -> None:
    with (
        FaultProxy(upstream[0], answer_continue=False) as p,
        socket.create_connection(("127.0.0.1", p.port), timeout=5) as s,
    ):
        s.sendall(
            b"PUT /obj HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY)
        )
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(100)  # nothing: the client must send the body unasked
        s.settimeout(5)
        s.sendall(BODY)
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    assert upstream[1] == [BODY]


def test_error_for_an_expect_request_is_sent_before_the_body(proxy: FaultProxy) -> None:
    proxy.error(503, "SlowDown", method="PUT", count=1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(
            b"PUT /obj HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
        )
        reply = b""
        while data := s.recv(65536):
            reply += data
    assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close" in reply
    assert b"<Code>SlowDown</Code>" in reply


# -- faults -----------------------------------------------------------------------------


def test_error_rule_fires_count_times_then_forwards(proxy: FaultProxy) -> None:
    rule = proxy.error(500, "InternalError", method="GET", path=r"^/plain", count=2)
    c = conn(proxy)
    answers = []
    for _ in range(3):
        c.request("GET", "/plain")
        r = c.getresponse()
        answers.append((r.status, r.read()))
    c.close()
    assert [a[0] for a in answers] == [500, 500, 200]
    assert b"<Code>InternalError</Code>" in answers[0][1]
    assert b"<Resource>/plain</Resource>" in answers[0][1]
    assert answers[2][1] == BODY
    assert rule.applied == 2 and rule.exhausted
    stats = proxy.stats()
    assert (stats.requests, stats.forwarded, stats.faults["error"]) == (3, 1, 2)
    assert [r.status for r in proxy.records()] == [500, 500, 200]


def test_rules_match_method_and_path(proxy: FaultProxy) -> None:
    proxy.error(404, "NoSuchBucket", method="PUT")
    proxy.error(403, "AccessDenied", path=r"/secret")
    assert get(proxy, "/plain")[0] == 200
    assert get(proxy, "/secret/x")[0] == 403


def test_probability_is_reproducible_with_a_seed(upstream: tuple[str, list[bytes]]) -> None:
    patterns = []
    for _ in range(2):
        with FaultProxy(upstream[0], seed=42) as p:
            p.error(503, "SlowDown", probability=0.5)
            c = conn(p)
            seen = []
            for _ in range(16):
                c.request("HEAD", "/plain")
                r = c.getresponse()
                r.read()
                seen.append(r.status)
            c.close()
            patterns.append(seen)
    assert patterns[0] == patterns[1]
    assert set(patterns[0]) == {200, 503}


def test_reset_mid_response_body(proxy: FaultProxy) -> None:
    rule = proxy.reset("response", after_bytes=100_000, count=1)
    c = conn(proxy)
    c.request("GET", "/plain")
    r = c.getresponse()
    assert r.status == 200
    with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
        r.read()
    c.close()
    assert rule.applied == 1
    assert proxy.stats().bytes_down == 100_000
    assert proxy.records()[0].status is None
    assert get(proxy) == (200, BODY)  # the next request gets through


@pytest.mark.parametrize("path", ["/chunked", "/until-close"])
def test_reset_cuts_every_framing_short(proxy: FaultProxy, path: str) -> None:
    proxy.reset("response", after_bytes=10**9, count=1)  # beyond the end: cut at the end
    c = conn(proxy)
    c.request("GET", path)
    r = c.getresponse()
    with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
        r.read()
    c.close()


def test_reset_mid_request_body(proxy: FaultProxy, upstream: tuple[str, list[bytes]]) -> None:
    proxy.reset("request", after_bytes=50_000, method="PUT", count=1)
    c = conn(proxy)
    with pytest.raises((ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        c.request("PUT", "/obj", body=BODY)
        c.getresponse().read()
    c.close()
    assert upstream[1] in ([], [BODY[:50_000]])  # never the whole body
    assert proxy.stats().bytes_up == 50_000


def test_corrupt_response_flips_bytes_in_place(proxy: FaultProxy) -> None:
    proxy.corrupt("response", after_bytes=60_000, nbytes=3, method="GET", count=2)
    for path in ("/plain", "/chunked"):
        status, got = get(proxy, path)
        assert status == 200 and len(got) == len(BODY)
        diff = [i for i in range(len(BODY)) if got[i] != BODY[i]]
        assert diff == [60_000, 60_001, 60_002]
        assert all(got[i] == BODY[i] ^ 0xFF for i in diff)
    assert get(proxy, "/plain") == (200, BODY)
    assert proxy.stats().bytes_corrupted == 6


def test_corrupt_request_reaches_the_server(
    proxy: FaultProxy, upstream: tuple[str, list[bytes]]
) -> None:
    proxy.corrupt("request", after_bytes=5, method="PUT", count=1)
    c = conn(proxy)
    c.request("PUT", "/obj", body=BODY)
    assert c.getresponse().read() != hashlib.sha256(BODY).hexdigest().encode()
    c.close()
    (stored,) = upstream[1]
    assert len(stored) == len(BODY) and stored != BODY and stored[5] == BODY[5] ^ 0xFF


def test_throttle_caps_the_rate(proxy: FaultProxy) -> None:
    rate = 400_000.0
    rule = proxy.throttle(rate, "response", method="GET")
    t0 = time.monotonic()
    assert get(proxy) == (200, BODY)
    seconds = time.monotonic() - t0
    # A token bucket is a hard ceiling: no faster than its burst plus rate x time.
    assert len(BODY) <= rule.rate * seconds + 2 * max(1024.0, rate / 10)
    assert proxy.stats().throttled_seconds > 0


def test_throttle_on_request_bodies(proxy: FaultProxy, upstream: tuple[str, list[bytes]]) -> None:
    proxy.throttle(400_000.0, "request", method="PUT")
    c = conn(proxy)
    t0 = time.monotonic()
    c.request("PUT", "/obj", body=BODY)
    c.getresponse().read()
    c.close()
    assert time.monotonic() - t0 >= (len(BODY) - 2 * 40_000) / 400_000
    assert upstream[1] == [BODY]


# -- shaping ----------------------------------------------------------------------------


def test_shaping_delays_every_answer_by_the_first_byte_latency(
    upstream: tuple[str, list[bytes]],
) -> None:
    with FaultProxy(upstream[0], shaping=Shaping(first_byte_latency=0.2)) as p:
        c = conn(p)
        for _ in range(2):  # each request on a kept-alive connection, not just the first
            t0 = time.monotonic()
            c.request("GET", "/plain")
            r = c.getresponse()
            assert time.monotonic() - t0 >= 0.2  # the head itself waits
            assert r.read() == BODY
        c.close()
        assert p.stats().shaped_seconds >= 0.3


def test_shaping_caps_each_connection_not_the_link(upstream: tuple[str, list[bytes]]) -> None:
    rate = 400_000.0  # BODY (204,800 bytes) takes about half a second on one connection
    with FaultProxy(upstream[0], shaping=Shaping(0.0, rate)) as p:
        t0 = time.monotonic()
        assert get(p) == (200, BODY)
        one = time.monotonic() - t0
        # A hard ceiling: no faster than a 10 ms burst plus rate x time.
        assert len(BODY) <= rate * one + 2 * max(1024.0, rate / 100)
        # Four connections at once each get the whole rate (as S3 connections do): four
        # times the bytes in far less than four times the time of one.
        results: list[tuple[int, bytes]] = []
        threads = [threading.Thread(target=lambda: results.append(get(p))) for _ in range(4)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        four = time.monotonic() - t0
        assert results == [(200, BODY)] * 4
        assert four < 3 * one, (four, one)
        # Request bodies are shaped too.
        c = conn(p)
        t0 = time.monotonic()
        c.request("PUT", "/obj", body=BODY)
        c.getresponse().read()
        c.close()
        assert time.monotonic() - t0 >= (len(BODY) - 2 * 4_000) / rate
        assert upstream[1][-1] == BODY


def test_stall_outlasts_a_client_timeout(proxy: FaultProxy) -> None:
    rule = proxy.stall(1.5, method="GET", count=1)
    c = conn(proxy, timeout=0.3)
    c.request("GET", "/plain")
    with pytest.raises(TimeoutError):
        c.getresponse()
    c.close()
    assert rule.applied == 1
    assert get(proxy) == (200, BODY)


def test_stop_ends_stalled_connections_and_joins_threads(
    upstream: tuple[str, list[bytes]],
) -> None:
    before = len(faultproxy_threads())
    p = FaultProxy(upstream[0]).start()
    p.stall(60, method="GET")
    c = conn(p, timeout=10)
    c.request("GET", "/plain")
    time.sleep(0.2)
    t0 = time.monotonic()
    p.stop()
    assert time.monotonic() - t0 < 3
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        c.getresponse()
    c.close()
    assert len(faultproxy_threads()) == before


# -- control API, validation --------------------------------------------------------------


def test_http_control_api(proxy: FaultProxy) -> None:
    c = conn(proxy)
    spec = {"kind": "error", "status": 503, "code": "SlowDown", "path": "^/plain", "count": 1}
    c.request("POST", CONTROL_RULES_PATH, body=json.dumps(spec))
    r = c.getresponse()
    added = json.loads(r.read())
    assert r.status == 200 and added["id"] >= 1 and added["kind"] == "error"
    c.request("POST", CONTROL_RULES_PATH, body=json.dumps({"kind": "error", "bogus": 1}))
    r = c.getresponse()
    assert r.status == 400 and "bogus" in json.loads(r.read())["error"]
    c.close()
    assert get(proxy)[0] == 503
    assert get(proxy)[0] == 200
    c = conn(proxy)
    c.request("GET", CONTROL_STATS_PATH)
    stats = json.loads(c.getresponse().read())
    assert stats["faults"] == {"error": 1} and stats["forwarded"] == 1
    c.request("DELETE", CONTROL_RULES_PATH)
    assert json.loads(c.getresponse().read()) == {"rules": []}
    c.close()
    assert proxy.rules == []


@pytest.mark.parametrize(
    "upstream_url",
    ["http://10.1.2.3:80", "https://127.0.0.1:443", "http://example.com:80", "http://127.0.0.1"],
)
def test_only_a_loopback_http_upstream(upstream_url: str) -> None:
    with pytest.raises(ValueError, match="upstream"):
        FaultProxy(upstream_url)


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "throttle", "rate": 0},
        {"kind": "stall", "seconds": 0},
        {"kind": "error", "status": 200},
        {"kind": "reset", "phase": "both"},
        {"kind": "error", "probability": 1.5},
        {"kind": "explode"},
        {"method": "GET"},
    ],
)
def test_bad_rules_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Rule.from_dict(spec)
