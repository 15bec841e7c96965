"""A fault-injecting HTTP/1.1 reverse proxy on loopback, between a client and a local S3.

Nothing here runs in production. The tests, ``make chaos`` and the demo put it between
the daemon's S3 client and moto, then tell it what to break:

* ``error``: answer with an S3-style XML error (503 SlowDown, 500 InternalError,
  403 AccessDenied, 404 NoSuchBucket, ...) without forwarding the request;
* ``reset``: cut the connection with a TCP RST (``SO_LINGER`` 0) part-way through the
  request body (phase ``request``) or the response body (phase ``response``);
* ``throttle``: cap the bytes per second of request and/or response bodies, one token
  bucket per rule shared by every connection it matches (a link, not a socket);
* ``stall``: forward the request, then wait before relaying the answer (longer than the
  client's read timeout, typically);
* ``corrupt``: flip bytes of the response body on its way to the client, or of the
  request body on its way to the server (which then stores bad bytes), same length.

Besides faults, the proxy can *shape* every connection the way S3 on AWS behaves
(:class:`Shaping`, ``--shape``): a first-byte latency (each answer starts no sooner than
30 ms after its request ended) and a bandwidth cap per connection (90 MB/s each way), so
that, as on AWS, a client's throughput grows with its number of connections instead of
with whatever loopback allows. The benchmarks run through it (``bench/servers.py``).
With ``verify_checksums`` (``--verify-checksums``) it also refuses a request body that
does not match its ``x-amz-checksum-*`` header with ``400 BadDigest`` and nothing stored,
as S3 on AWS does and the stand-ins do not (:mod:`.checksums`).

A rule matches a method and a regex searched in the request target (``/bucket/key?query``),
and fires for the next ``count`` matching requests (None: every one), each with
``probability`` drawn from the proxy's seeded RNG. Per request at most one rule of each
kind fires, the first in the order added; an ``error`` excludes every other kind.

The proxy answers ``Expect: 100-continue`` itself (botocore sends it for PUTs of more
than 1 MB) and never passes it upstream; with ``answer_continue=False`` it ignores the
header, and botocore sends the body anyway after waiting 1 s. An ``error`` for such a
request is sent before the body, with ``Connection: close``.

Drive it from Python (:meth:`FaultProxy.add`, :meth:`FaultProxy.error`, ...) or, from
another process, over HTTP on ``/__faultproxy__/`` (``GET stats``, ``POST rules`` with a
rule as JSON, ``DELETE rules``). Run standalone::

    python -m daemon.standins.faultproxy --upstream http://127.0.0.1:5000 [--port 0] [--seed 1]

Only loopback: the proxy listens on 127.0.0.1 and forwards only to a loopback upstream.

The package, one job a module: :mod:`.rules` (the kinds, what a rule matches, which fire),
:mod:`.shaping` (token buckets and the S3-on-AWS shaping), :mod:`.wire` (HTTP/1.1 on a
socket), :mod:`.body` (a body relayed with its faults), :mod:`.checksums` (a body checked
against its checksum header, as AWS does), :mod:`.upstream` (the server side),
:mod:`.connection` (one client connection), :mod:`.control` (the HTTP control API),
:mod:`.stats` (records and counters), :mod:`.proxy` (:class:`FaultProxy`), :mod:`.cli`
(the command line).
"""

from daemon.standins.faultproxy.cli import main
from daemon.standins.faultproxy.control import (
    CONTROL_PREFIX,
    CONTROL_RULES_PATH,
    CONTROL_STATS_PATH,
)
from daemon.standins.faultproxy.proxy import FaultProxy
from daemon.standins.faultproxy.rules import FaultKind, Phase, Rule, RuleMatch
from daemon.standins.faultproxy.shaping import (
    DEFAULT_CONNECTION_RATE,
    DEFAULT_FIRST_BYTE_LATENCY,
    Shaping,
)
from daemon.standins.faultproxy.stats import ProxyStats, RequestRecord

__all__ = [
    "CONTROL_PREFIX",
    "CONTROL_RULES_PATH",
    "CONTROL_STATS_PATH",
    "DEFAULT_CONNECTION_RATE",
    "DEFAULT_FIRST_BYTE_LATENCY",
    "FaultKind",
    "FaultProxy",
    "Phase",
    "ProxyStats",
    "RequestRecord",
    "Rule",
    "RuleMatch",
    "Shaping",
    "main",
]
