"""What the tests of staging share (test_pipeline.py, test_tail.py; no tests here).

A daemon store on the local S3 server with small parts and the sync staging its local
dir (:func:`store_and_sync`, :func:`syncing`; the ``staging`` fixture in conftest.py:
one per test), a checkpoint written into its ``.tmp-step-*`` directory the way CONTRACT
§4 says, a file at a time, with the manifest and the rename last (:class:`StepWriter`),
and the open multipart uploads of a bucket. What must not live here: how a test writes
its files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from test_store import PART, RUN

from daemon import layout
from daemon.deadline import ThroughputEstimate
from daemon.standins import LocalS3
from daemon.storage.s3client import RemoteLocation, make_s3_client, make_transfer_config
from daemon.storage.store import CheckpointStore
from daemon.storage.sync import CheckpointSync


def make_store(
    s3: LocalS3, bucket: str, concurrency: int = 4, crt: bool = False
) -> CheckpointStore:
    client = make_s3_client(s3.endpoint_url, "us-east-1", 2 * concurrency)
    config = make_transfer_config(part_size=PART, max_concurrency=concurrency)
    return CheckpointStore(client, RemoteLocation(bucket, "runs"), RUN, config, crt=crt)


@contextlib.contextmanager
def syncing(
    store: CheckpointStore, local_dir: Path, **sync_options: Any
) -> Iterator[CheckpointSync]:
    """The sync staging ``local_dir`` into ``store`` (with ``sync_options``, e.g.
    ``keep_remote``); the sync's stager and the store closed after."""
    sync = CheckpointSync(
        store, local_dir, ThroughputEstimate(), rescan_interval=60, **sync_options
    )
    try:
        yield sync
    finally:
        sync.stager.close()
        store.close()


@contextlib.contextmanager
def store_and_sync(
    s3: LocalS3,
    bucket: str,
    local_dir: Path,
    concurrency: int = 4,
    crt: bool = False,
    **sync_options: Any,
) -> Iterator[tuple[CheckpointStore, CheckpointSync]]:
    """A store (:func:`make_store`) and the sync staging ``local_dir`` into it (:func:`syncing`)."""
    store = make_store(s3, bucket, concurrency, crt)
    with syncing(store, local_dir, **sync_options) as sync:
        yield store, sync


class StepWriter:
    """One checkpoint of step ``step`` being written in ``local_dir``: its ``.tmp-step-*``
    directory now; :meth:`finish` writes the manifest of ``files`` and renames it."""

    def __init__(self, local_dir: Path, step: int) -> None:
        self.local_dir = local_dir
        self.step = step
        self.tmp = local_dir / f".tmp-{layout.step_dir_name(step)}-test-{os.urandom(2).hex()}"
        self.tmp.mkdir(parents=True)
        self.files: dict[str, bytes] = {}

    def finish(self, files: dict[str, bytes] | None = None) -> Path:
        """Manifest (of ``files``, default: what was written) last, then the rename."""
        doc = {
            "format": layout.MANIFEST_FORMAT,
            "run_id": RUN,
            "step": self.step,
            "created_at": layout.utc_now_iso(),
            "reason": "interrupt",
            "files": [
                {"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                for n, d in (files if files is not None else self.files).items()
            ],
        }
        (self.tmp / layout.MANIFEST_NAME).write_text(json.dumps(doc))
        final = self.local_dir / layout.step_dir_name(self.step)
        os.rename(self.tmp, final)
        return final


def open_uploads(s3_client: Any, bucket: str) -> list[str]:
    resp = s3_client.list_multipart_uploads(Bucket=bucket)
    return [u["Key"] for u in resp.get("Uploads", [])]
