"""Local stand-ins for the cloud, for the demo and the tests: moto's S3 server on loopback.

Nothing here runs in production. moto is imported lazily, so the daemon installs
and runs without it; only ``spot-supervisor demo`` and the tests need the ``demo`` extra.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

# moto accepts any credentials; these keep botocore from looking further down its
# chain (and from ever asking a real metadata service for an instance role).
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def use_fake_aws_credentials() -> None:
    """Point this process's botocore at fake credentials (tests and demo only)."""
    os.environ.update(FAKE_AWS_ENV)


class StandinUnavailable(RuntimeError):
    """The demo extra (moto) is not installed."""


@dataclass
class LocalS3:
    """moto's S3 server on 127.0.0.1, spoken to over real HTTP."""

    endpoint_url: str
    _server: Any

    def stop(self) -> None:
        self._server.stop()


def start_local_s3() -> LocalS3:
    """Start moto's threaded server on a free loopback port."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise StandinUnavailable(
            "moto is not installed; install the demo extra: pip install 'spot-supervisor[demo]'"
        ) from exc
    use_fake_aws_credentials()
    # werkzeug logs every request to stderr; the demo's and the tests' output is ours.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return LocalS3(f"http://{host}:{port}", server)
