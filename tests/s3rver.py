"""s3rver (npm ``s3rver``, pinned in tests/npm/package.json) on loopback, for the tests.

s3rver is a small S3-compatible server written in Node.js that keeps objects in a
directory. It stands for the "S3-compatible server that is not AWS" a user may point the
daemon at; ``make install`` installs it (``npm ci --prefix tests/npm``). moto stays the
stand-in for AWS (see :mod:`daemon.standins`). Nothing here runs in production.

What s3rver 3.7.1 does not model (seen against it with boto3 on Node 20, or read in its
source where marked):

- **Multipart ETags.** The ETag of a completed multipart upload is the MD5 of the whole
  object, not AWS's MD5 of the parts' MD5s with ``-N``. Single PUTs and parts do get
  the MD5 of their bytes, and a copy keeps its source's ETag.
- **Additional checksums.** ``x-amz-checksum-*`` is ignored: nothing is verified, kept
  or returned (HEAD with ``ChecksumMode=ENABLED`` shows none). Over plain http botocore
  sends the checksum as a header, which is harmless. Source: it does not decode
  ``aws-chunked`` bodies either, so over https (where botocore moves the checksum into
  a trailer) an upload would be stored with its chunk framing; use
  ``s3.checksum_algorithm = "none"`` with s3rver over TLS.
- **Signatures.** SigV4 is not checked at all (source): only the access key id is looked
  up, so the launcher registers the tests' fake key. Payload hashes are never checked.
- **Conditional requests.** ``If-Match`` on GET and HEAD, ``x-amz-copy-source-if-match``
  and ``If-None-Match: *`` on PUT are ignored; only ``If-None-Match`` and
  ``If-Modified-Since`` on GET are honoured.
- **Listing.** ListObjectsV2 works while the answer fits one page; with ``MaxKeys`` or a
  continuation token it fails with ``InternalError`` (its tokens use DES, which Node 17+
  no longer has), so prefixes of more than 1,000 keys cannot be listed.
- **Multipart housekeeping.** ListMultipartUploads is ``NotImplemented`` and
  AbortMultipartUpload is ``MethodNotAllowed``: unfinished uploads cannot be found or
  aborted (the supervisor's boot-time cleanup logs ``multipart_cleanup_failed``).
- **Ranged GET.** ``bytes=a-b`` and ``bytes=a-`` work; a suffix range ``bytes=-n`` returns
  the first n+1 bytes instead of the last n.
- **Encryption, versioning, object lock, ACLs, bucket policies:** not modelled. A PUT
  asking for SSE-KMS is stored unencrypted, answered without ``ServerSideEncryption``
  and with the MD5 ETag.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.standins.npm import INSTALL_HINT, NODE_MODULES, find_node, stop_server

# Run by node: register the tests' fake access key (s3rver knows only its own "S3RVER"),
# start the server on the port given (0: any free one) and print that port.
_LAUNCHER = r"""
const S3rver = require('s3rver');
const { DUMMY_ACCOUNT } = require('s3rver/lib/models/account');
const [directory, bucket, accessKey, secretKey] = process.argv.slice(1);
DUMMY_ACCOUNT.createKeyPair(accessKey, secretKey);
new S3rver({
  address: '127.0.0.1',
  port: 0,
  silent: true,
  directory,
  vhostBuckets: false,
  configureBuckets: bucket ? [{ name: bucket, configs: [] }] : [],
})
  .run()
  .then(({ port }) => console.log(JSON.stringify({ port })))
  .catch((err) => { console.error(err); process.exit(1); });
"""


class S3rverUnavailable(RuntimeError):
    """node or the s3rver package is missing."""


@dataclass
class S3rver:
    """One s3rver process serving ``directory`` on ``endpoint_url``."""

    endpoint_url: str
    directory: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        stop_server(self.proc)


def _node() -> str:
    needed = NODE_MODULES / "s3rver" / "package.json"
    return find_node("s3rver", needed, INSTALL_HINT, S3rverUnavailable)


def _wait_until_answering(host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise S3rverUnavailable(f"s3rver exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise S3rverUnavailable(f"s3rver did not answer on {host}:{port} within 15 s")


def start_s3rver(directory: Path, bucket: str = "", *, access_key: str = "testing") -> S3rver:
    """Start s3rver on a free 127.0.0.1 port, storing in ``directory``, with ``bucket``.

    ``access_key`` (also the secret: s3rver checks no signature) is the key id the
    clients use: the tests' fake credentials (:data:`daemon.standins.FAKE_AWS_ENV`).
    """
    node = _node()
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}
    proc = subprocess.Popen(
        [node, "-e", _LAUNCHER, str(directory), bucket, access_key, access_key],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        port = int(json.loads(line)["port"])
        _wait_until_answering("127.0.0.1", port, proc)
    except (ValueError, KeyError, S3rverUnavailable) as exc:
        proc.kill()
        proc.wait()
        raise S3rverUnavailable(f"s3rver did not start ({exc}); {INSTALL_HINT}") from exc
    return S3rver(f"http://127.0.0.1:{port}", directory, proc)
