"""GCP and Azure notices against the metadata emulator's GCE and Azure modes, over HTTP:
what each source reports, and the named faults (dropped hanging GETs, a wrong ETag, 5xx,
a slow first call), and that nothing the network does holds up the watcher's stop."""

from __future__ import annotations

import datetime as dt
import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import config
from daemon.notices import Notice, build_sources
from daemon.notices.azure import AzureEventsSource, AzureIdentity
from daemon.notices.gcp import (
    MAINTENANCE_EVENT_PATH,
    PREEMPTED_PATH,
    PREEMPTION_NOTICE_S,
    GcpIdentity,
    GcpMaintenanceSource,
    GcpPreemptionSource,
)
from daemon.notices.imds import INSTANCE_ID_PATH, INSTANCE_TYPE_PATH, MetadataUnavailable
from daemon.notices.watch import NoticeWatcher
from daemon.standins.emulator import MetadataEmulator

WAIT = 5.0


@pytest.fixture
def gce() -> Iterator[MetadataEmulator]:
    with MetadataEmulator(provider="gcp") as md:
        yield md


@pytest.fixture
def azure() -> Iterator[MetadataEmulator]:
    with MetadataEmulator(provider="azure") as md:
        yield md


def _get(url: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()


def _until(pred, timeout: float = WAIT):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


# --- the GCE emulator -----------------------------------------------------------------


def test_gce_emulator_needs_the_flavor_header_and_sends_etags(gce: MetadataEmulator) -> None:
    assert _get(gce.url, PREEMPTED_PATH, {})[0] == 403
    status, headers, body = _get(gce.url, PREEMPTED_PATH, {"Metadata-Flavor": "Google"})
    assert (status, body) == (200, "FALSE")
    assert headers["metadata-flavor"] == "Google" and headers["etag"] == gce.gcp_etag(
        PREEMPTED_PATH
    )
    # A stale ETag is answered at once, with the current value.
    t0 = time.monotonic()
    path = f"{PREEMPTED_PATH}?wait_for_change=true&last_etag=stale&timeout_sec=30"
    assert _get(gce.url, path, {"Metadata-Flavor": "Google"})[2] == "FALSE"
    assert time.monotonic() - t0 < 1.0


# --- GCP sources ----------------------------------------------------------------------


def test_gcp_preemption_is_an_interruption_30s_after_it_was_seen(gce: MetadataEmulator) -> None:
    source = GcpPreemptionSource(gce.url, retry_pause=0.1)
    try:
        assert source.poll() == []
        assert source.watch.wait_for(lambda v: v == "FALSE", WAIT)
        _until(lambda: gce.stats().count("GET", PREEMPTED_PATH) >= 2)  # the value, then a hang
        requests_before = gce.stats().count("GET", PREEMPTED_PATH)
        time.sleep(0.5)  # hanging: no polling meanwhile
        assert gce.stats().count("GET", PREEMPTED_PATH) == requests_before
        t0 = dt.datetime.now(dt.timezone.utc)
        gce.set_preempted()
        assert source.watch.wait_for(lambda v: v == "TRUE", 1.0), "the hanging GET did not answer"
        [notice] = source.poll()
        assert notice.kind == "interruption" and notice.action == "preempt"
        assert notice.source == "gcp-metadata"
        lead = (notice.deadline - t0).total_seconds()
        assert PREEMPTION_NOTICE_S - 1 <= lead <= PREEMPTION_NOTICE_S + 1
        assert source.poll() == [notice]  # the same notice, same id: delivered once
    finally:
        source.close()


def test_gcp_dropped_hanging_gets_are_retried_at_once(gce: MetadataEmulator) -> None:
    # A pause would fail the test. Hanging GETs of 1 s: the one the thread may have sent
    # before the fault below is added ends by its timeout, not by the test's, and the
    # faults then apply to the next two either way.
    source = GcpPreemptionSource(gce.url, retry_pause=5.0, hang_s=1)
    try:
        source.poll()
        assert source.watch.wait_for(lambda v: v == "FALSE", WAIT)
        # The next two hanging GETs are cut off after 0.2 s without an answer.
        gce.add_fault("close", PREEMPTED_PATH, count=2, delay_s=0.2)
        _until(lambda: gce.stats().faults_applied >= 2)  # both dropped, each retried at once
        gce.set_preempted()
        assert source.watch.wait_for(lambda v: v == "TRUE", 2.0)
        assert [n.action for n in source.poll()] == ["preempt"]
    finally:
        source.close()


def test_gcp_a_wrong_etag_costs_a_request_never_a_miss(gce: MetadataEmulator) -> None:
    source = GcpPreemptionSource(gce.url, retry_pause=0.3)
    try:
        gce.add_fault("etag", PREEMPTED_PATH, count=3)  # three answers with a bogus ETag
        source.poll()
        assert source.watch.wait_for(lambda v: v == "FALSE", WAIT)
        _until(lambda: gce.stats().count("GET", PREEMPTED_PATH) >= 4)
        time.sleep(0.6)
        settled = gce.stats().count("GET", PREEMPTED_PATH)
        time.sleep(0.6)
        assert gce.stats().count("GET", PREEMPTED_PATH) == settled, "still spinning"
        gce.set_preempted()
        assert source.watch.wait_for(lambda v: v == "TRUE", 1.0)
        assert source.poll()[0].kind == "interruption"
    finally:
        source.close()


def test_gcp_5xx_is_reported_then_recovers(gce: MetadataEmulator) -> None:
    gce.add_fault("status", PREEMPTED_PATH, status=503, count=2)
    source = GcpPreemptionSource(gce.url, retry_pause=0.1)
    try:
        source.poll()
        with pytest.raises(MetadataUnavailable, match="HTTP 503"):
            _until(lambda: source.watch.latest()[2] is not None)
            source.poll()
        assert source.watch.wait_for(lambda v: v == "FALSE", WAIT)
        assert source.poll() == []
    finally:
        source.close()


def test_gcp_slow_first_call_blocks_neither_poll_nor_the_watchers_stop(
    gce: MetadataEmulator,
) -> None:
    gce.add_fault("delay", PREEMPTED_PATH, count=1, delay_s=3.0)
    source = GcpPreemptionSource(gce.url, retry_pause=0.1)
    seen: list[Notice] = []
    watcher = NoticeWatcher([source], seen.append, poll_interval=0.05).start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert source.poll() == []  # nothing known yet, and no waiting for it
    watcher.stop(timeout=2.0)
    source.close()
    assert time.monotonic() - t0 < 0.5, "stop waited for the hanging GET"
    assert not watcher.running


def test_gcp_watcher_stop_does_not_wait_for_a_hanging_get(gce: MetadataEmulator) -> None:
    sources = [GcpPreemptionSource(gce.url), GcpMaintenanceSource(gce.url)]
    watcher = NoticeWatcher(sources, lambda n: None, poll_interval=0.05).start()
    assert sources[0].watch.wait_for(lambda v: v == "FALSE", WAIT)
    time.sleep(0.3)  # both hanging now
    t0 = time.monotonic()
    watcher.stop()
    for s in sources:
        s.close()
    assert time.monotonic() - t0 < 0.5


def test_gcp_terminate_on_host_maintenance_asks_for_a_checkpoint(gce: MetadataEmulator) -> None:
    source = GcpMaintenanceSource(gce.url, retry_pause=0.1)
    try:
        source.poll()
        assert source.watch.wait_for(lambda v: v == "NONE", WAIT)
        gce.set_maintenance_event("MIGRATE_ON_HOST_MAINTENANCE")
        assert source.watch.wait_for(lambda v: v == "MIGRATE_ON_HOST_MAINTENANCE", 1.0)
        assert source.poll() == []  # a live migration needs nothing
        gce.set_maintenance_event("TERMINATE_ON_HOST_MAINTENANCE")
        assert source.watch.wait_for(lambda v: v and v.startswith("TERMINATE"), 1.0)
        [notice] = source.poll()
        assert notice.kind == "rebalance" and notice.action == "TERMINATE_ON_HOST_MAINTENANCE"
        assert gce.stats().count("GET", MAINTENANCE_EVENT_PATH) <= 4
    finally:
        source.close()


def test_gcp_identity_answers_the_ec2_paths(gce: MetadataEmulator) -> None:
    ident = GcpIdentity(gce.url)
    assert ident.get_text(INSTANCE_ID_PATH) == "4711471147114711471"
    assert ident.get_text(INSTANCE_TYPE_PATH) == "a2-highgpu-1g"
    assert ident.get_text("/latest/meta-data/nothing-like-it") is None


# --- Azure ----------------------------------------------------------------------------


def test_azure_emulator_needs_the_metadata_header(azure: MetadataEmulator) -> None:
    path = "/metadata/scheduledevents?api-version=2020-07-01"
    assert _get(azure.url, path, {})[0] == 400
    assert _get(azure.url, "/metadata/scheduledevents", {"Metadata": "true"})[0] == 400
    status, _, body = _get(azure.url, path, {"Metadata": "true"})
    assert status == 200 and '"Events": []' in body


def test_azure_preempt_for_this_vm_is_an_interruption_at_not_before(
    azure: MetadataEmulator,
) -> None:
    source = AzureEventsSource(azure.url, poll_interval=0.1).start()
    try:
        assert source.wait_answered(WAIT) and source.vm_name == "vm-spot-0"
        when = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=30)
        mine = azure.set_azure_event("Preempt", when)
        azure.set_azure_event("Preempt", when, resources=["another-vm"])
        azure.set_azure_event("Terminate", when, status="Started")
        notices = _until(lambda: source.poll() if len(source.poll()) >= 2 else None)
        preempt = next(n for n in notices if n.action == "preempt")
        assert preempt.kind == "interruption" and preempt.deadline == when
        assert preempt.source == "azure-scheduled-events" and preempt.raw == mine
        started = next(n for n in notices if n.action == "terminate")
        assert started.deadline <= dt.datetime.now(dt.timezone.utc)  # under way: now
        assert len(notices) == 2  # the other VM's event is not ours
    finally:
        source.close()


def test_azure_reboot_redeploy_freeze_ask_for_a_checkpoint(azure: MetadataEmulator) -> None:
    source = AzureEventsSource(azure.url, poll_interval=0.1).start()
    try:
        for kind in ("Reboot", "Redeploy", "Freeze"):
            azure.set_azure_event(kind)
        notices = _until(lambda: source.poll() if len(source.poll()) == 3 else None)
        assert {(n.kind, n.action) for n in notices} == {
            ("rebalance", "Reboot"),
            ("rebalance", "Redeploy"),
            ("rebalance", "Freeze"),
        }
    finally:
        source.close()


def test_azure_slow_first_call_does_not_block_the_supervisor(azure: MetadataEmulator) -> None:
    # The service enabling itself: the first events call takes 2 s.
    azure.add_fault("delay", "/metadata/scheduledevents", count=1, delay_s=2.0)
    source = AzureEventsSource(azure.url, poll_interval=0.1)
    watcher = NoticeWatcher([source], lambda n: None, poll_interval=0.05).start()
    t0 = time.monotonic()
    assert source.poll() == []  # still enabling: nothing, at once
    assert time.monotonic() - t0 < 0.1
    assert source.wait_answered(WAIT)
    azure.set_azure_event("Preempt")
    assert _until(lambda: source.poll())[0].action == "preempt"
    t0 = time.monotonic()
    watcher.stop()
    source.close()
    assert time.monotonic() - t0 < 0.5


def test_azure_5xx_and_dropped_connections_are_reported_then_recover(
    azure: MetadataEmulator,
) -> None:
    source = AzureEventsSource(azure.url, poll_interval=0.1).start()
    try:
        assert source.wait_answered(WAIT)
        azure.add_fault("status", "/metadata/scheduledevents", status=500, count=3)
        with pytest.raises(MetadataUnavailable, match="HTTP 500"):
            _until(lambda: source.poll() is None)  # poll raises once a call failed
        azure.add_fault("close", "/metadata/scheduledevents", count=2)
        azure.set_azure_event("Preempt")
        assert _until(lambda: _poll_quietly(source))[0].action == "preempt"
    finally:
        source.close()


def _poll_quietly(source: AzureEventsSource) -> list[Notice] | None:
    try:
        return source.poll()
    except MetadataUnavailable:
        return None


def test_azure_events_are_approved_only_after_a_commit(azure: MetadataEmulator) -> None:
    source = AzureEventsSource(azure.url, poll_interval=0.1).start()
    try:
        event = azure.set_azure_event("Preempt")
        _until(lambda: source.poll())
        assert azure.azure_approvals() == []  # a notice is no approval
        assert source.approve_after_commit(committed=False) == []
        assert azure.azure_approvals() == []
        assert source.approve_after_commit(committed=True) == [event["EventId"]]
        assert azure.azure_approvals() == [event["EventId"]]
        assert source.approve_after_commit(committed=True) == []  # once
    finally:
        source.close()


def test_azure_identity_answers_the_ec2_paths(azure: MetadataEmulator) -> None:
    ident = AzureIdentity(azure.url)
    assert ident.get_text(INSTANCE_ID_PATH) == "02aab8a4-74ef-476e-8182-f6d2ba4166a6"
    assert ident.get_text(INSTANCE_TYPE_PATH) == "Standard_NC24ads_A100_v4"
    assert ident.get_text("/latest/meta-data/spot/instance-action") is None


# --- build_sources --------------------------------------------------------------------


def _cfg(tmp_path: Path, provider: str, url: str, **azure: object) -> config.Config:
    return config.build(
        {
            "run": {"id": "r", "command": ["true"]},
            "checkpoints": {"local_dir": str(tmp_path), "remote": "s3://bkt/p"},
            "imds": {"provider": provider, "url": url, "poll_interval": 0.1},
            **({"azure": azure} if azure else {}),
        }
    )


def test_build_sources_per_provider(
    tmp_path: Path, gce: MetadataEmulator, azure: MetadataEmulator
) -> None:
    aws = build_sources(_cfg(tmp_path, "aws", "http://127.0.0.1:9"))
    assert [
        (s.name, n) for s, n in (x if isinstance(x, tuple) else (x, 1) for x in aws.watched)
    ] == [
        ("aws-spot", 1),
        ("aws-rebalance", 5),
        ("aws-maintenance", 5),
    ]
    assert aws.notice_s == 120 and aws.maintenance is aws.watched[2][1 - 1]  # type: ignore[index]
    aws.close()

    gcp = build_sources(_cfg(tmp_path, "gcp", gce.url))
    assert [s.name for s in gcp.watched] == ["gcp-preempted", "gcp-maintenance"]  # type: ignore[union-attr]
    assert gcp.notice_s == 30 and gcp.maintenance.active_event_ids() == frozenset()
    assert gcp.metadata.get_text(INSTANCE_ID_PATH) == "4711471147114711471"
    _until(lambda: gcp.request_counter() >= 2)  # the threads started at once
    gcp.after_emergency_commit(True)  # nothing to approve on GCP
    gcp.close()

    az = build_sources(_cfg(tmp_path, "azure", azure.url))
    event = azure.set_azure_event("Terminate")
    _until(lambda: az.watched[0].poll())  # type: ignore[union-attr]
    az.after_emergency_commit(True)
    assert azure.azure_approvals() == [event["EventId"]]
    az.close()

    off = build_sources(_cfg(tmp_path, "azure", azure.url, approve_after_commit=False))
    second = azure.set_azure_event("Preempt")
    _until(lambda: off.watched[0].poll())  # type: ignore[union-attr]
    off.after_emergency_commit(True)
    assert second["EventId"] not in azure.azure_approvals()
    off.close()
