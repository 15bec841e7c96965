"""The baseline: the seed article's spot poller, as written there.

A background thread that, every ``interval`` seconds (5 in the article), fetches a new
IMDSv2 token and then GETs ``spot/instance-action``; on a 200 it calls back (here: sends
SIGTERM to the trainer, as the article's SIGTERM handler expects). Run as a process:

    python -m bench.seed_baseline IMDS_URL INTERVAL -- TRAINER ARGV...
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import requests


def poll_spot_interruption(
    callback: Callable[[], None], base: str, interval: float = 5
) -> threading.Thread:
    """The article's poller, with its metadata address made a parameter."""
    url = f"{base}/latest/meta-data/spot/instance-action"
    token_url = f"{base}/latest/api/token"

    def _poll() -> None:
        while True:
            try:
                token = requests.put(
                    token_url, headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}, timeout=2
                ).text
                resp = requests.get(url, headers={"X-aws-ec2-metadata-token": token}, timeout=2)
                if resp.status_code == 200:
                    callback()
                    return
            except requests.exceptions.RequestException:
                pass
            time.sleep(interval)

    t = threading.Thread(target=_poll, daemon=True)
    t.start()
    return t


def main(argv: list[str]) -> int:
    base, interval = argv[0], float(argv[1])
    child = subprocess.Popen(argv[3:])
    poll_spot_interruption(lambda: child.send_signal(signal.SIGTERM), base, interval)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
