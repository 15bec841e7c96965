"""The chaos run's short version (``tests/chaos_run.py --short``) in the suite.

Ten events of every kind (a spot notice, SIGKILL of the trainer mid-save, SIGKILL of the
supervisor mid-upload and mid-commit, a rebalance recommendation, five S3 faults) hit
one training run; after each, the bucket's invariants are checked from outside the
daemon, and the run must end with the same parameters as an uninterrupted one.
``make chaos`` runs the full version (60 events).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chaos_run import KINDS, SHORT, Chaos
from test_store import PART, RUN, make_checkpoint, make_store

from daemon.standins import LocalS3
from daemon.standins.faultproxy import FaultProxy
from daemon.storage.s3client import RemoteLocation, StoreError, make_s3_client, make_transfer_config
from daemon.storage.store import CheckpointStore

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    report = Chaos(SHORT, tmp_path / "chaos").run()
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    evidence = f"work dir {tmp_path}; report:\n{json.dumps(report, indent=2)[:6000]}"
    assert report["failure"] is None, evidence
    assert report["ok"], evidence
    assert report["events_applied"] >= SHORT.events, evidence
    # The short schedule opens with one event of every kind (tried; applied when a
    # window came, which it does in practice).
    tried = set(report["events_by_kind"]) | set(report["events_skipped_no_window"])
    assert tried == set(KINDS), evidence
    assert report["hash_equal"], evidence
    assert report["invariant_checks"] >= SHORT.events + 1
    assert report["restore_checks"] >= 2


# -- found by chaos: a manifest corrupted on its way up ------------------------------------


def test_manifest_corrupted_in_flight_is_not_reported_committed(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    src, manifest = make_checkpoint(tmp_path / "src", 10)
    raw = (src / "manifest.json").read_bytes()
    with FaultProxy(s3_server.endpoint_url, seed=3) as proxy:
        rule = proxy.corrupt(
            "request", after_bytes=len(raw) // 2, method="PUT", path=r"manifest\.json", count=1
        )
        client = make_s3_client(proxy.url, "us-east-1", 8)
        store = CheckpointStore(
            client, RemoteLocation(bucket, "spot-runs"), RUN, make_transfer_config(PART, 4)
        )
        try:
            store.upload_checkpoint(src, manifest)
        except StoreError:
            reported = False  # refusing to claim the commit is a correct answer too
        else:
            reported = True
        assert rule.applied == 1
    if reported:
        # Whatever the daemon reports committed must be what a restore finds.
        assert [c.step for c in make_store(s3_server, bucket).list_committed()] == [10]
        key = f"spot-runs/{RUN}/checkpoints/step-000000010/manifest.json"
        body = s3_client.get_object(Bucket=bucket, Key=key, ChecksumMode="DISABLED")["Body"]
        assert body.read() == raw
