"""``python -m daemon.standins.faultproxy --upstream URL``: the proxy as a process of its own.

Prints the proxy's URL on stdout, then serves until SIGINT or SIGTERM. The benchmarks
start it this way with ``--shape`` (``bench/servers.py``), so that its CPU is not theirs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from daemon.standins.faultproxy.proxy import FaultProxy
from daemon.standins.faultproxy.shaping import (
    DEFAULT_CONNECTION_RATE,
    DEFAULT_FIRST_BYTE_LATENCY,
    Shaping,
)


def main(argv: list[str] | None = None) -> int:
    """``python -m daemon.standins.faultproxy --upstream URL``: serve until SIGINT or SIGTERM."""
    from daemon.standins import faultproxy  # the package: its docstring is the --help text

    parser = argparse.ArgumentParser(
        prog="python -m daemon.standins.faultproxy", description=faultproxy.__doc__
    )
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:<port> of the server")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any)")
    parser.add_argument("--seed", type=int, default=0, help="seed of probabilistic rules")
    parser.add_argument(
        "--shape", action="store_true", help="shape every connection as S3 on AWS (see Shaping)"
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=DEFAULT_FIRST_BYTE_LATENCY * 1000,
        help="with --shape: first-byte latency (default %(default)g ms)",
    )
    parser.add_argument(
        "--connection-mbps",
        type=float,
        default=DEFAULT_CONNECTION_RATE / 1e6,
        help="with --shape: MB/s per connection, each way (default %(default)g)",
    )
    parser.add_argument(
        "--verify-checksums",
        action="store_true",
        help="refuse a body that does not match its x-amz-checksum-* header (400 BadDigest),"
        " as S3 on AWS does",
    )
    args = parser.parse_args(argv)
    try:
        shaping = (
            Shaping(args.latency_ms / 1000, args.connection_mbps * 1e6) if args.shape else None
        )
        proxy = FaultProxy(
            args.upstream,
            port=args.port,
            seed=args.seed,
            shaping=shaping,
            verify_checksums=args.verify_checksums,
        )
    except ValueError as exc:
        print(f"faultproxy: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with proxy:
        print(proxy.url, flush=True)
        while not done.wait(1.0):
            pass
    return 0
