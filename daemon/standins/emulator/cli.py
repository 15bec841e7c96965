"""``python -m daemon.standins.emulator [--provider aws|gcp|azure] [--port N]``: the
emulator as a process of its own.

Prints its URL on stdout (one line; its events go to stderr), optionally publishes a
notice ``--notice-in`` seconds from now, and serves until SIGINT or SIGTERM. Drive it
with :class:`.client.EmulatorControl`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
import threading
from collections.abc import Sequence

from daemon.log import configure as configure_logging
from daemon.standins.emulator.aws import SPOT_ACTIONS
from daemon.standins.emulator.service import PROVIDERS, MetadataEmulator
from daemon.standins.emulator.times import utc_now


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m daemon.standins.emulator``: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m daemon.standins.emulator",
        description="A local EC2 metadata service (IMDSv2).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    parser.add_argument(
        "--notice-in", type=float, metavar="S", help="publish a notice for now + S seconds"
    )
    parser.add_argument("--action", default="terminate", choices=SPOT_ACTIONS)
    parser.add_argument(
        "--provider", default="aws", choices=PROVIDERS, help="whose metadata service (default aws)"
    )
    args = parser.parse_args(argv)
    # Events go to stderr so that stdout carries exactly one line: the URL.
    configure_logging(stream=sys.stderr)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()  # only record; the main thread stops the server

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    emulator = MetadataEmulator(args.host, args.port, provider=args.provider).start()
    try:
        if args.notice_in is not None and args.provider == "gcp":
            threading.Timer(args.notice_in, emulator.set_preempted).start()
        elif args.notice_in is not None and args.provider == "azure":
            emulator.set_azure_event("Preempt", utc_now() + dt.timedelta(seconds=args.notice_in))
        elif args.notice_in is not None:
            emulator.set_notice(args.action, utc_now() + dt.timedelta(seconds=args.notice_in))
        print(emulator.url, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
    return 0
