"""The S3 servers the transfer and emergency benchmarks run against, shaped like AWS.

Two independent implementations, each in a process of its own on loopback:

* ``moto``: moto's server (Python), the project's stand-in for AWS. It copies the whole
  object for every ranged GET, so ranged restores look far worse on it than on S3.
* ``s3rver``: s3rver (Node.js, npm, pinned in ``tests/npm``; ``make install``), which
  serves byte ranges natively. Its multipart ETags are the whole object's MD5, not AWS's
  MD5 of the parts' MD5s, so our commit reads such objects back to verify them.

Every request goes through the fault proxy's shaping (:class:`Shaping`, also a process
of its own, so its CPU is not ours): a first-byte latency and a bandwidth cap per
connection, so concurrency matters as it does against S3. The proxy also verifies each
body's additional checksum and refuses a wrong one (``--verify-checksums``), as S3 on
AWS does and neither server does; the daemon's preflight probe finds that, as it finds
AWS's, and the emergency tail then leaves the check to the server instead of computing
MD5s for the ETag check (:mod:`daemon.storage.tail`). The server and the proxy run
on CPUs of their own, the instance's parties (the client, the trainer) on the others, as
on AWS (:mod:`bench.placement`). Each row names its server, shaping and placement;
absolute speeds are this machine's, and the rows record each party's CPU seconds where
that decides the outcome.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from bench.placement import Placement, describe, pin, pin_self, split
from daemon.standins import FAKE_AWS_ENV, use_fake_aws_credentials
from daemon.standins.faultproxy import Shaping
from daemon.standins.npm import stop_server

REPO = Path(__file__).resolve().parent.parent
# $SPOT_BENCH_SERVERS (comma-separated) narrows them, e.g. to moto for the test suite.
SERVERS = tuple(
    s for s in os.environ.get("SPOT_BENCH_SERVERS", "moto,s3rver").split(",") if s.strip()
)
AWS_SHAPING = Shaping()  # 30 ms first byte, 90 MB/s per connection (sources in faultproxy)


@dataclass
class Server:
    """One S3 server behind the shaping proxy: point clients at ``endpoint_url``."""

    name: str
    endpoint_url: str  # the shaping proxy's
    direct_url: str  # the server's own
    proc: subprocess.Popen[bytes]  # the server (its CPU is metered)
    proxy: subprocess.Popen[bytes]
    shaping: Shaping
    placement: Placement
    verify_checksums: bool = True

    @property
    def label(self) -> str:
        """``moto, shaped 30 ms + 90 MB/s/conn, checksums verified; server and proxy on
        CPU 1, instance on CPU 0``: what each row says of its server."""
        s = self.shaping
        verified = ", checksums verified" if self.verify_checksums else ""
        return (
            f"{self.name}, shaped {s.first_byte_latency * 1000:g} ms"
            f" + {s.connection_rate / 1e6:g} MB/s/conn{verified}; {describe(self.placement)}"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _load_s3rver() -> ModuleType:
    # tests/s3rver.py is the launcher the tests use; one copy of its quirks list.
    name = "_bench_s3rver"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "s3rver.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def available(name: str) -> str | None:
    """None when server ``name`` can run here, else why not."""
    if name == "moto":
        return None
    mod = _load_s3rver()
    try:
        mod._node()
    except mod.S3rverUnavailable as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _moto() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **FAKE_AWS_ENV},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield url, proc
    finally:
        stop_server(proc)


@contextlib.contextmanager
def _s3rver(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    mod = _load_s3rver()
    directory = workdir / f"s3rver-{os.urandom(3).hex()}"
    server = mod.start_s3rver(directory)
    try:
        yield server.endpoint_url, server.proc
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _proxy(
    upstream: str, shaping: Shaping, verify_checksums: bool
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.standins.faultproxy",
            "--upstream",
            upstream,
            "--shape",
            "--latency-ms",
            str(shaping.first_byte_latency * 1000),
            "--connection-mbps",
            str(shaping.connection_rate / 1e6),
            *(["--verify-checksums"] if verify_checksums else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("http://"):
            raise RuntimeError(f"the shaping proxy did not start ({line!r})")
        yield line, proc
    finally:
        stop_server(proc)


@contextlib.contextmanager
def server(
    name: str, workdir: Path, shaping: Shaping = AWS_SHAPING, verify_checksums: bool = True
) -> Iterator[Server]:
    """Server ``name`` (``moto`` or ``s3rver``) behind the shaping proxy (which verifies
    checksums as AWS does, unless told not to), each on the cloud's CPUs; this process on
    the instance's until the block ends."""
    use_fake_aws_credentials()
    placement = split()
    mine = os.sched_getaffinity(0)
    start = _moto() if name == "moto" else _s3rver(workdir)
    try:
        with start as (url, proc), _proxy(url, shaping, verify_checksums) as (proxy_url, proxy):
            pin(proc.pid, placement.cloud)
            pin(proxy.pid, placement.cloud)
            pin_self(placement)
            yield Server(name, proxy_url, url, proc, proxy, shaping, placement, verify_checksums)
    finally:
        pin(os.getpid(), frozenset(mine))  # the next benchmark gets every CPU again


def aws_cli() -> str | None:
    """The AWS CLI (PyPI ``awscli``, in ``.venv-awscli`` or on PATH), or None.

    Kept out of the project's own environment: awscli pins its own botocore.
    """
    local = REPO / ".venv-awscli" / "bin" / "aws"
    if local.is_file():
        return str(local)
    return shutil.which("aws")
