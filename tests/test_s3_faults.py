"""S3 faults, each a named test of what the store does: retry, back off, fall back, or stop.

Every test runs real store operations (``upload_checkpoint``, ``restore_newest``) over
HTTP through the fault-injecting proxy (daemon/standins/faultproxy/) to moto, with checkpoints
of realistic shape: several files, a nested one, an empty one, and a 12 MiB file that
goes up in three 5 MiB parts and comes down in three ranged GETs. The proxy's counters
and request records show what the client did (how many attempts, which requests failed);
a store with a direct client (no proxy) checks what is really in the bucket.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, ReadTimeoutError
from structlog.testing import capture_logs
from test_restore import commit_steps_10_and_20
from test_store import PART, events, make_checkpoint, make_store, same_tree

from daemon.layout import MANIFEST_NAME, list_step_dirs
from daemon.standins import LocalS3
from daemon.standins.faultproxy import FaultProxy, RequestRecord
from daemon.storage.s3client import (
    COMPLETE_READ_TIMEOUT,
    IntegrityError,
    RemoteLocation,
    StoreError,
    make_s3_client,
    make_transfer_config,
)
from daemon.storage.store import CheckpointStore
from daemon.storage.transfers import _completing

RUN = "run-1"
MiB = 1024 * 1024
Calls = dict[str, list[RequestRecord]]
STEP10 = r"checkpoints/step-000000010/"
STEP20 = r"checkpoints/step-000000020/"


@pytest.fixture
def proxy(s3_server: LocalS3) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, seed=1234) as p:
        yield p


def proxied_store(
    proxy: FaultProxy,
    bucket: str,
    *,
    max_attempts: int = 5,
    read_timeout: float = 20.0,
    complete_read_timeout: float = COMPLETE_READ_TIMEOUT,
) -> CheckpointStore:
    """The daemon's store, its client pointed at the proxy (the daemon's own settings)."""
    client = make_s3_client(
        proxy.url,
        "us-east-1",
        8,
        max_attempts=max_attempts,
        read_timeout=read_timeout,
        complete_read_timeout=complete_read_timeout,
    )
    config = make_transfer_config(part_size=PART, max_concurrency=4)
    return CheckpointStore(client, RemoteLocation(bucket, "spot-runs"), RUN, config)


def leftovers(local_dir: Path) -> list[str]:
    if not local_dir.exists():
        return []
    return sorted(p.name for p in local_dir.iterdir() if p.name.startswith(".tmp-"))


def retried(proxy: FaultProxy, method: str | None = None, path: str | None = None) -> Calls:
    """The API calls that took more than one attempt: their requests, oldest first.

    botocore sends every attempt of one call with the same ``amz-sdk-invocation-id``.
    Waits for requests still being served (a stalled one) so the records are complete.
    """
    assert proxy.wait_idle(10)
    calls: Calls = {}
    for r in sorted(proxy.records(method, path), key=lambda r: r.started):
        calls.setdefault(r.headers.get("amz-sdk-invocation-id", r.target), []).append(r)
    return {i: rs for i, rs in calls.items() if len(rs) > 1}


def committed_steps(s3_server: LocalS3, bucket: str) -> list[int]:
    """What is committed, seen without the proxy."""
    return [c.step for c in make_store(s3_server, bucket).list_committed()]


def manifest_keys(s3_client: Any, bucket: str) -> list[str]:
    resp = s3_client.list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in resp.get("Contents", []) if o["Key"].endswith(MANIFEST_NAME)]


# -- retry and back off ---------------------------------------------------------------------


def test_slowdown_burst_is_retried_with_backoff(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path
) -> None:
    """503 SlowDown on the next 6 PUTs (parts, files, manifest): retried, committed."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    rule = proxy.error(503, "SlowDown", method="PUT", path=STEP10, count=6)
    result = proxied_store(proxy, bucket).upload_checkpoint(src, manifest)

    assert result.step == 10 and not result.already_committed
    assert rule.applied == 6
    again = retried(proxy, "PUT")
    assert sum(1 for rs in again.values() for r in rs if r.status == 503) == 6
    for rs in again.values():
        # Each failed attempt was followed by the next attempt of the same request, which
        # came only after a pause (botocore's jittered exponential backoff).
        assert [r.attempt for r in rs] == list(range(1, len(rs) + 1))
        assert rs[-1].status == 200
    gaps = [
        b.started - (a.started + a.seconds)
        for rs in again.values()
        for a, b in itertools.pairwise(rs)
    ]
    assert len(gaps) == 6 and sum(gaps) > 0.05
    assert committed_steps(s3_server, bucket) == [10]
    restored = proxied_store(proxy, bucket).restore_newest(tmp_path / "dest")
    assert restored is not None and restored.step == 10
    same_tree(src, restored.path)


def test_slowdown_that_does_not_stop_fails_with_a_clear_message(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path
) -> None:
    """SlowDown on every PUT of a part: after its attempts the upload stops, nothing committed."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    rule = proxy.error(503, "SlowDown", method="PUT", path=r"state\.bin\?")
    with pytest.raises(StoreError) as caught:
        # max_attempts=2: the first attempt and one retry (attempts in all).
        proxied_store(proxy, bucket, max_attempts=2).upload_checkpoint(src, manifest)

    err = caught.value
    assert err.code == "Throttled"
    assert str(err).count("\n") == 0
    assert f"s3://{bucket}/spot-runs/{RUN}/{STEP10}state.bin" in str(err)
    assert "throttled by S3 (SlowDown) after retries" in str(err)
    assert rule.applied >= 2  # every attempt of at least one part was throttled
    assert committed_steps(s3_server, bucket) == []


def test_internal_errors_are_retried(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path
) -> None:
    """500 InternalError once on every kind of request an upload and a restore make."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    store = proxied_store(proxy, bucket)
    upload_requests = [
        ("GET", r"\?list-type=2&prefix=[^&]*step-000000010"),  # ListObjectsV2 of the step
        ("POST", r"state\.bin\?uploads"),  # CreateMultipartUpload
        ("PUT", r"state\.bin\?.*partNumber=1"),  # UploadPart
        ("POST", r"state\.bin\?uploadId="),  # CompleteMultipartUpload
        ("PUT", r"optimizer\.pt$"),  # PutObject
        ("PUT", r"manifest\.json$"),  # PutObject of the commit
    ]
    rules = [
        proxy.error(500, "InternalError", method=m, path=p, count=1) for m, p in upload_requests
    ]
    store.upload_checkpoint(src, manifest)
    assert [r.applied for r in rules] == [1] * len(rules)
    assert committed_steps(s3_server, bucket) == [10]

    restore_requests = [
        r"\?list-type=2",  # ListObjectsV2 of the run
        r"manifest\.json$",  # the manifest
        r"model\.pt$",  # a whole GET
        r"state\.bin$",  # the first ranged GET
    ]
    rules += [
        proxy.error(500, "InternalError", method="GET", path=p, count=1) for p in restore_requests
    ]
    result = store.restore_newest(tmp_path / "dest")
    assert [r.applied for r in rules] == [1] * len(rules)
    assert result is not None and result.step == 10
    same_tree(src, result.path)
    again = retried(proxy)
    assert len(again) == len(rules)  # each failed call was retried, and then got through
    assert all([r.status for r in rs] == [500, rs[-1].status] for rs in again.values())
    assert all(rs[-1].status in (200, 206) for rs in again.values())


def test_connection_reset_mid_upload_is_retried(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, s3_client: Any, tmp_path: Path
) -> None:
    """RST part-way through the body of a multipart part and of a single PUT: retried."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    part = proxy.reset(
        "request", after_bytes=2 * MiB, method="PUT", path=r"state\.bin\?.*partNumber=2", count=1
    )
    whole = proxy.reset(
        "request", after_bytes=100_000, method="PUT", path=r"optimizer\.pt$", count=1
    )
    proxied_store(proxy, bucket).upload_checkpoint(src, manifest)

    assert (part.applied, whole.applied) == (1, 1)
    again = retried(proxy, "PUT")
    assert len(again) == 2
    for rs in again.values():
        assert [r.status for r in rs] == [None, 200]  # reset, then the retry got through
    assert committed_steps(s3_server, bucket) == [10]
    # The stored bytes are the file's, not a truncated first attempt.
    key = f"spot-runs/{RUN}/{STEP10}optimizer.pt"
    assert (
        s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        == (src / "optimizer.pt").read_bytes()
    )
    result = make_store(s3_server, bucket).restore_newest(tmp_path / "dest")
    assert result is not None and result.step == 10
    same_tree(src, result.path)


def test_connection_reset_mid_download_is_retried(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path
) -> None:
    """RST part-way through ranged GETs of the large file and a whole GET: retried."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    make_store(s3_server, bucket).upload_checkpoint(src, manifest)
    ranged = proxy.reset("response", after_bytes=MiB, method="GET", path=r"state\.bin", count=2)
    whole = proxy.reset("response", after_bytes=50_000, method="GET", path=r"model\.pt$", count=1)

    dest = tmp_path / "dest"
    with capture_logs() as logs:
        result = proxied_store(proxy, bucket).restore_newest(dest)

    assert (ranged.applied, whole.applied) == (2, 1)
    assert result is not None and result.step == 10 and result.downloaded
    same_tree(src, result.path)
    assert len(events(logs, "download_retry")) == 3
    assert not events(logs, "restore_skipped")
    assert leftovers(dest) == []


def test_bandwidth_cap_completes_at_the_capped_rate(
    proxy: FaultProxy, bucket: str, tmp_path: Path
) -> None:
    """8 MB/s on uploads, then on downloads: both complete, at no more than the cap."""
    rate = 8e6
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    store = proxied_store(proxy, bucket)

    up = proxy.throttle(rate, "request", method="PUT")
    uploaded = store.upload_checkpoint(src, manifest)
    proxy.remove(up)
    down = proxy.throttle(rate, "response", method="GET")
    restored = store.restore_newest(tmp_path / "dest")

    assert restored is not None and restored.step == 10
    same_tree(src, restored.path)
    assert up.applied >= 4 and down.applied >= 4  # every file and part went through it
    stats = proxy.stats()
    assert stats.throttled_seconds > 0
    # The measured throughput is the cap's, give or take its burst (a token bucket is a
    # ceiling, so this holds on any machine); the figures the daemon reports agree.
    for mbps in (uploaded.mbps, restored.mbps):
        assert 0 < mbps * 1e6 <= rate * 1.5


def test_stall_longer_than_read_timeout_is_retried(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path
) -> None:
    """The answer to one PUT stalls 2 s; the client (read timeout 1 s) gives up, retries."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    rule = proxy.stall(2.0, method="PUT", path=r"model\.pt$", count=1)
    result = proxied_store(proxy, bucket, read_timeout=1).upload_checkpoint(src, manifest)

    assert rule.applied == 1 and result.step == 10
    (rs,) = retried(proxy, "PUT", r"model\.pt$").values()
    assert [r.attempt for r in rs] == [1, 2]
    assert rs[0].seconds >= 1.0  # the first attempt was abandoned only at the timeout
    assert committed_steps(s3_server, bucket) == [10]


def test_a_complete_that_outlasts_the_read_timeout_is_found_done(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path
) -> None:
    """CompleteMultipartUpload of a large object can take longer than the client waits
    (a loaded server took over 20 s for 256 MiB): the server did complete it, and a retry
    finds the upload gone. The object settles it; the commit's ETag check still verifies
    its bytes."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    rule = proxy.stall(2.0, method="POST", path=r"state\.bin\?uploadId=", count=1)
    # One attempt: the timeout itself is what the upload sees (moto answers a retried
    # complete with success; AWS with NoSuchUpload, see test_which_failures_may_be_a_slow_complete).
    store = proxied_store(proxy, bucket, max_attempts=1, read_timeout=1, complete_read_timeout=1)
    with capture_logs() as logs:
        result = store.upload_checkpoint(src, manifest)
    assert rule.applied == 1 and result.step == 10
    (done,) = events(logs, "upload_completed_on_retry")
    assert done["key"].endswith("state.bin")
    assert events(logs, "checkpoint_etags_checked")[0]["checked"] == len(manifest.files)
    assert committed_steps(s3_server, bucket) == [10]


def test_a_complete_waits_for_its_answer_longer_than_other_requests(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path
) -> None:
    """S3 keeps a slow complete's connection alive; servers that do not (s3rver, moto)
    answer only once the object is assembled. The complete alone waits out the stall
    (COMPLETE_READ_TIMEOUT): sent once, not again for the server to assemble twice,
    while a stalled PUT of the same client still times out at 1 s and is retried."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    complete = proxy.stall(2.0, method="POST", path=r"state\.bin\?uploadId=", count=1)
    put = proxy.stall(2.0, method="PUT", path=r"model\.pt$", count=1)
    store = proxied_store(proxy, bucket, read_timeout=1)
    with capture_logs() as logs:
        result = store.upload_checkpoint(src, manifest)
    assert complete.applied == put.applied == 1 and result.step == 10
    assert not events(logs, "upload_completed_on_retry")
    (sent,) = proxy.records("POST", r"state\.bin\?uploadId=")
    assert sent.seconds >= 2.0 and sent.status == 200
    assert list(retried(proxy)) and all(rs[0].method == "PUT" for rs in retried(proxy).values())
    assert committed_steps(s3_server, bucket) == [10]


def test_which_failures_may_be_a_slow_complete() -> None:
    url = "https://b.s3.amazonaws.com/k?uploadId=abc"
    taken = ClientError({"Error": {"Code": "NoSuchUpload"}}, "CompleteMultipartUpload")
    assert _completing(taken)
    assert _completing(ReadTimeoutError(endpoint_url=url))
    assert not _completing(ClientError({"Error": {"Code": "500"}}, "UploadPart"))
    assert not _completing(ReadTimeoutError(endpoint_url=url + "&partNumber=2"))
    assert not _completing(ReadTimeoutError(endpoint_url="https://b.s3.amazonaws.com/k"))


def test_a_failed_part_is_not_taken_for_a_slow_complete(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path
) -> None:
    """Only the completing request's failure waits for the object: a part that fails for
    good fails the upload at once."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    proxy.stall(2.0, method="PUT", path=r"state\.bin\?.*partNumber=2", count=1)
    store = proxied_store(proxy, bucket, max_attempts=1, read_timeout=1)
    with capture_logs() as logs, pytest.raises(StoreError, match=r"state\.bin"):
        store.upload_checkpoint(src, manifest)
    assert not events(logs, "upload_completed_on_retry")
    assert committed_steps(s3_server, bucket) == []


def test_stall_that_does_not_end_fails_with_a_timeout_message(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path
) -> None:
    """Every GET of one file stalls: restore stops naming the timeout, installs nothing."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    make_store(s3_server, bucket).upload_checkpoint(src, manifest)
    rule = proxy.stall(30.0, method="GET", path=r"model\.pt$")

    dest = tmp_path / "dest"
    with pytest.raises(StoreError) as caught:
        proxied_store(proxy, bucket, max_attempts=2, read_timeout=1).restore_newest(dest)

    err = caught.value
    assert err.code == "Timeout"
    assert f"s3://{bucket}/spot-runs/{RUN}/{STEP10}model.pt" in str(err)
    assert "timed out waiting for" in str(err) and "\n" not in str(err)
    assert rule.applied == 2  # the first attempt and its one retry both timed out
    assert list_step_dirs(dest) == [] and leftovers(dest) == []


# -- stop with a clear message ------------------------------------------------------------


def test_access_denied_on_upload_stops_and_commits_nothing(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, s3_client: Any, tmp_path: Path
) -> None:
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    rule = proxy.error(403, "AccessDenied", method="PUT", path=r"optimizer\.pt$")
    with pytest.raises(StoreError) as caught:
        proxied_store(proxy, bucket).upload_checkpoint(src, manifest)

    err = caught.value
    assert err.code == "AccessDenied"
    assert str(err) == (
        f"upload s3://{bucket}/spot-runs/{RUN}/{STEP10}optimizer.pt: access denied"
        f" (check the role's S3 permissions on bucket {bucket!r})"
    )
    assert rule.applied == 1  # not retried: permissions do not fix themselves
    assert manifest_keys(s3_client, bucket) == []
    assert committed_steps(s3_server, bucket) == []


def test_access_denied_on_restore_stops_instead_of_falling_back(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path
) -> None:
    store = make_store(s3_server, bucket)
    for step in (10, 20):
        store.upload_checkpoint(*make_checkpoint(tmp_path / "src", step, big=step == 20))
    proxy.error(403, "AccessDenied", method="GET", path=STEP20 + r"state\.bin")

    dest = tmp_path / "dest"
    with pytest.raises(StoreError) as caught:
        proxied_store(proxy, bucket).restore_newest(dest)
    assert caught.value.code == "AccessDenied"
    assert f"s3://{bucket}/spot-runs/{RUN}/{STEP20}state.bin" in str(caught.value)
    # An older checkpoint would throw progress away over a permissions problem.
    assert list_step_dirs(dest) == [] and leftovers(dest) == []


@pytest.mark.parametrize("how", ["injected", "real"])
def test_no_such_bucket_names_the_bucket(
    proxy: FaultProxy, bucket: str, tmp_path: Path, how: str
) -> None:
    src, manifest = make_checkpoint(tmp_path / "src", 10)
    if how == "injected":
        target = bucket
        proxy.error(404, "NoSuchBucket")
    else:
        target = f"missing-{bucket}"
    store = proxied_store(proxy, target)
    with pytest.raises(StoreError) as up:
        store.upload_checkpoint(src, manifest)
    with pytest.raises(StoreError) as down:
        store.restore_newest(tmp_path / "dest")
    for err in (up.value, down.value):
        assert err.code == "NoSuchBucket"
        assert f"bucket {target!r} does not exist" in str(err) and "\n" not in str(err)
    assert proxy.stats().requests == 2  # neither retried


# -- fall back: bytes corrupted in flight ---------------------------------------------------


@pytest.mark.parametrize("victim", ["model.pt", "state.bin"])  # a whole GET, ranged GETs
def test_body_corrupted_on_download_falls_back_to_the_older_checkpoint(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, tmp_path: Path, victim: str
) -> None:
    """Bytes flipped on the way down from step 20: skipped with a warning, step 10 restored."""
    store = make_store(s3_server, bucket)
    src10, _src20 = commit_steps_10_and_20(store, tmp_path / "src")
    offset = 3 * MiB if victim == "state.bin" else 1000  # not in the first range: any one
    rule = proxy.corrupt("response", after_bytes=offset, method="GET", path=STEP20 + victim)

    dest = tmp_path / "dest"
    with capture_logs() as logs:
        result = proxied_store(proxy, bucket).restore_newest(dest)

    assert rule.applied >= 1 and proxy.stats().bytes_corrupted >= 1
    assert result is not None and result.step == 10 and result.downloaded
    same_tree(src10, result.path)
    (skipped,) = events(logs, "restore_skipped")
    assert skipped["log_level"] == "warning" and skipped["step"] == 20
    assert victim in skipped["reason"] and (
        "sha256" in skipped["reason"] or "checksum" in skipped["reason"]
    )
    assert [s for s, _ in list_step_dirs(dest)] == [10]  # no step 20, bad bytes nowhere
    assert leftovers(dest) == []


@pytest.mark.parametrize("victim", ["model.pt", "state.bin"])  # a single PUT, a part
def test_body_corrupted_on_upload_is_never_restored(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, s3_client: Any, tmp_path: Path, victim: str
) -> None:
    """Bytes flipped on the way up, and again when sent once more: moto stores them (it
    checks no checksum); the ETag check refuses to commit. Committed anyway (as a store
    that checks nothing would), restore's own sha256 refuses it and falls back."""
    store = proxied_store(proxy, bucket)
    src10, m10 = make_checkpoint(tmp_path / "src", 10, big=True)
    src20, m20 = make_checkpoint(tmp_path / "src", 20, big=True)
    store.upload_checkpoint(src10, m10)
    path = STEP20 + (r"state\.bin\?.*partNumber=2" if victim == "state.bin" else r"model\.pt$")
    rule = proxy.corrupt("request", after_bytes=1000, method="PUT", path=path, count=2)
    with capture_logs() as logs, pytest.raises(IntegrityError) as caught:
        store.upload_checkpoint(src20, m20)
    assert rule.applied == 2  # the upload, and the one retry of the file
    assert victim in str(caught.value) and "manifest not written" in str(caught.value)
    (differ,) = events(logs, "uploaded_bytes_differ")
    assert differ["path"] == victim and differ["step"] == 20
    assert committed_steps(s3_server, bucket) == [10]
    stored = s3_client.get_object(
        Bucket=bucket, Key=f"spot-runs/{RUN}/{STEP20}{victim}", ChecksumMode="DISABLED"
    )["Body"].read()
    assert stored != (src20 / victim).read_bytes()  # the server did keep the bad bytes

    # A commit over those bytes without the check: restore never installs it.
    store.commit_manifest(20, m20, (src20 / MANIFEST_NAME).read_bytes())
    assert committed_steps(s3_server, bucket) == [20, 10]
    dest = tmp_path / "dest"
    with capture_logs() as logs:
        result = make_store(s3_server, bucket).restore_newest(dest)
    assert result is not None and result.step == 10
    same_tree(src10, result.path)
    assert [s for s, _ in list_step_dirs(dest)] == [10]
    assert [e["step"] for e in events(logs, "restore_skipped")] == [20]


@pytest.mark.parametrize("victim", ["model.pt", "state.bin"])
def test_body_corrupted_on_upload_is_caught_before_the_commit(
    proxy: FaultProxy, bucket: str, s3_server: LocalS3, s3_client: Any, tmp_path: Path, victim: str
) -> None:
    """Bytes flipped once on the way up: the stored ETag is not the local MD5 (multipart:
    MD5 of the parts' MD5s), so the file is sent again and only then committed."""
    src, manifest = make_checkpoint(tmp_path / "src", 10, big=True)
    path = STEP10 + (r"state\.bin\?.*partNumber=2" if victim == "state.bin" else r"model\.pt$")
    rule = proxy.corrupt("request", after_bytes=1000, method="PUT", path=path, count=1)
    with capture_logs() as logs:
        result = proxied_store(proxy, bucket).upload_checkpoint(src, manifest)
    assert rule.applied == 1 and result.step == 10
    (differ,) = events(logs, "uploaded_bytes_differ")
    assert differ["path"] == victim
    (checked,) = events(logs, "checkpoint_etags_checked")
    assert checked["checked"] == len(manifest.files) and checked["unchecked"] == {}
    # What is committed holds the manifest's bytes.
    (ckpt,) = make_store(s3_server, bucket).list_committed()
    assert ckpt.verified
    for entry in ckpt.manifest.files:
        body = s3_client.get_object(
            Bucket=bucket, Key=ckpt.keys[entry.path], ChecksumMode="DISABLED"
        )["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry.sha256, entry.path
