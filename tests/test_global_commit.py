"""The global commit of a multi-node checkpoint, and what protects other nodes' uploads
(issue 12), against moto's S3 server over HTTP. Each "node" is a CheckpointStore with
its own node id and local dir; their part checkpoints are built as the trainer builds
them (daemon.layout.CheckpointWriter with ranks, world_size, node, incarnation)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs
from test_store import RUN, events, make_store

from daemon import layout
from daemon.nodes import align_to_global_commit
from daemon.rendezvous import RendezvousIds, parse_id, user_chose_rdzv_id
from daemon.standins import LocalS3
from daemon.storage.global_commit import merge_parts, try_global_commit
from daemon.storage.store import CheckpointStore, started_before

INC = "run-1-s0-a0"


def node_store(s3: LocalS3, bucket: str, node_id: str) -> CheckpointStore:
    store = make_store(s3, bucket)
    store.node_id = node_id
    return store


def write_part(
    local: Path,
    step: int,
    rank: int,
    *,
    incarnation: str = INC,
    reason: str = "periodic",
    payload: bytes | None = None,
) -> tuple[Path, layout.Manifest]:
    """One node's share of a two-rank checkpoint: rank 0 holds the model, rank 1 its RNG."""
    extra = {"ranks": [rank], "world_size": 2, "node": str(rank), "incarnation": incarnation}
    with layout.CheckpointWriter(local, RUN, step, reason, extra=extra) as w:
        name = "model.pt" if rank == 0 else f"rng-rank{rank:05d}.pt"
        w.add_bytes(name, payload or (b"%d-%d" % (step, rank)) * 100)
        manifest = w.commit()
    return local / layout.step_dir_name(step), manifest


def upload(store: CheckpointStore, path: Path, manifest: layout.Manifest) -> Any:
    return store.upload_checkpoint(path, manifest)


def test_merge_needs_every_rank_and_is_deterministic(tmp_path: Path) -> None:
    _, p0 = write_part(tmp_path / "a", 10, 0)
    _, p1 = write_part(tmp_path / "b", 10, 1)
    assert merge_parts([p0], INC) is None  # rank 1 missing: not committable
    one = merge_parts([p0, p1], INC)
    two = merge_parts([p1, p0], INC)
    assert one is not None and two is not None
    assert one.to_json() == two.to_json()  # both finishers write the same bytes
    assert [f.path for f in one.files] == ["model.pt", "rng-rank00001.pt"]
    assert one.extra["ranks"] == [0, 1] and one.extra["world_size"] == 2


def test_the_last_node_to_finish_writes_the_commit(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    a, b = node_store(s3_server, bucket, "node-a"), node_store(s3_server, bucket, "node-b")
    with capture_logs() as logs:
        first = upload(a, *write_part(tmp_path / "a", 10, 0))
        assert first.part_of == INC and first.remote is None  # a part, not a commit
        assert a.list_committed() == []  # invisible to restore until the set is complete
        second = upload(b, *write_part(tmp_path / "b", 10, 1))
    assert second.part_of is None and second.remote is not None
    assert [c.step for c in a.list_committed()] == [10]
    commit = a.list_committed()[0]
    assert {f.path for f in commit.manifest.files} == {"model.pt", "rng-rank00001.pt"}
    assert commit.manifest.extra["nodes"] == ["0", "1"]
    assert len(events(logs, "global_checkpoint_committed")) == 1
    assert [e["node_id"] for e in events(logs, "checkpoint_part_uploaded")] == ["node-a"]
    # The other finisher, late, finds it committed and writes nothing.
    assert try_global_commit(a, 10, INC) == (commit, False)


def test_parts_of_two_incarnations_at_one_step_never_mix(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    a, b = node_store(s3_server, bucket, "node-a"), node_store(s3_server, bucket, "node-b")
    # A stale part: an earlier incarnation reached step 20 on node a, then node b died.
    stale = "run-1-s0-a3"
    upload(a, *write_part(tmp_path / "old", 20, 0, incarnation=stale, payload=b"old" * 50))
    # The current incarnation's node b alone must not complete the set with it.
    result = upload(b, *write_part(tmp_path / "b", 20, 1))
    assert result.remote is None and a.list_committed() == []
    upload(a, *write_part(tmp_path / "a", 20, 0))
    (commit,) = a.list_committed()
    assert commit.manifest.extra["incarnation"] == INC
    model = next(f for f in commit.manifest.files if f.path == "model.pt")
    assert model.size == len(b"20-0") * 100  # the current incarnation's bytes


def test_restore_finishes_a_commit_whose_last_finisher_died(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    a, b = node_store(s3_server, bucket, "node-a"), node_store(s3_server, bucket, "node-b")
    upload(a, *write_part(tmp_path / "a", 10, 0))
    upload(b, *write_part(tmp_path / "b", 10, 1))
    upload(a, *write_part(tmp_path / "a", 15, 0))
    upload(b, *write_part(tmp_path / "b", 15, 1))
    # Node b wrote its part of step 15 and died before the manifest: withdraw it.
    key = f"spot-runs/{RUN}/checkpoints/{layout.step_dir_name(15)}/manifest.json"
    s3_client.delete_object(Bucket=bucket, Key=key)
    assert [c.step for c in a.list_committed()] == [10]
    fresh = node_store(s3_server, bucket, "node-c")
    restored = fresh.restore_newest(tmp_path / "c")
    assert restored is not None and restored.step == 15 and restored.downloaded
    manifest = layout.load_complete(restored.path)
    assert manifest.extra["ranks"] == [0, 1]  # every node's files, on the new node
    assert [c.step for c in a.list_committed()] == [15, 10]


def test_a_survivor_sets_aside_its_part_and_uncommitted_steps_then_restores_in_full(
    s3_server: LocalS3, bucket: str, tmp_path: Path
) -> None:
    a, b = node_store(s3_server, bucket, "node-a"), node_store(s3_server, bucket, "node-b")
    local = tmp_path / "a"
    upload(a, *write_part(local, 10, 0))
    upload(b, *write_part(tmp_path / "b", 10, 1))
    write_part(local, 15, 0)  # the peer vanished before its part of 15: never committed
    result = align_to_global_commit(a, local)
    assert result is not None and result.step == 10 and result.downloaded
    assert [s for s, _ in layout.list_step_dirs(local)] == [10]
    assert {f.path for f in layout.load_complete(local / "step-000000010").files} == {
        "model.pt",
        "rng-rank00001.pt",
    }
    aside = sorted(p.name.split("-")[1] for p in (local / ".set-aside").iterdir())
    assert aside == ["000000010", "000000015"]  # kept, never deleted


def test_rendezvous_ids_are_agreed_and_never_reused(s3_server: LocalS3, bucket: str) -> None:
    a = RendezvousIds(make_store(s3_server, bucket))
    b = RendezvousIds(make_store(s3_server, bucket))
    first = a.next_id(100)
    assert first == b.next_id(100) == f"{RUN}-s100-a0"
    # A crash loop from step 100: both survivors close the same id, both pick the next.
    a.close(first)
    b.close(first)
    second = a.next_id(100)
    assert second == b.next_id(100) == f"{RUN}-s100-a1"
    a.close(second)
    assert b.next_id(100) == f"{RUN}-s100-a2"
    assert parse_id(second) == (100, 1)
    assert a.next_id(200) == f"{RUN}-s200-a0"  # a new committed step starts over
    assert a.next_id(None) == f"{RUN}-s0-a0"


def test_a_rendezvous_id_the_user_chose_is_left_alone() -> None:
    assert user_chose_rdzv_id(["torchrun", "--rdzv-id=x", "t.py"], {})
    assert user_chose_rdzv_id(["torchrun", "--rdzv_id", "x", "t.py"], {})
    assert user_chose_rdzv_id(["torchrun", "t.py"], {"PET_RDZV_ID": "x"})
    assert not user_chose_rdzv_id(["torchrun", "--rdzv-endpoint=h:1", "t.py"], {})


def test_boot_cleanup_spares_a_young_upload_of_another_node() -> None:
    """Defect: every boot aborted every multipart upload of the run, a peer's (or the old
    holder's emergency upload) included. Now only uploads initiated over an hour ago go.
    (moto answers every ListMultipartUploads with a fixed 2010 `Initiated`, so the filter
    is checked on the response shape AWS documents.)"""
    now = dt.datetime.now(dt.timezone.utc)
    cutoff = now.timestamp() - 3600
    assert started_before({"Initiated": now - dt.timedelta(hours=2)}, cutoff)
    assert not started_before({"Initiated": now - dt.timedelta(minutes=5)}, cutoff)
    assert not started_before({}, cutoff)  # no time: may be in flight


def test_a_cancelled_commit_aborts_only_its_own_uploads(
    s3_server: LocalS3, bucket: str, s3_client: Any
) -> None:
    """Defect: a cancellation aborted every multipart upload under the step, another
    node's uploads of the same step included."""
    store = make_store(s3_server, bucket)
    mine, theirs = store.file_key(7, "model.pt"), store.file_key(7, "rng-rank00001.pt")
    for key in (mine, theirs):
        s3_client.create_multipart_upload(Bucket=bucket, Key=key)
    assert store.abort_incomplete_uploads(store.step_prefix(7), keys={mine}) == 1
    uploads = s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [theirs]


def test_retention_spares_a_young_uncommitted_step(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Defect: retention deleted every uncommitted step older than the oldest kept one,
    which can be a lagging node's part upload in flight."""
    store = make_store(s3_server, bucket)
    lagging = store.file_key(1, "rng-rank00001.pt")
    s3_client.put_object(Bucket=bucket, Key=lagging, Body=b"in flight")
    for step in (2, 3, 4):
        with layout.CheckpointWriter(tmp_path, RUN, step, "periodic") as w:
            w.add_bytes("model.pt", b"%d" % step * 10)
            manifest = w.commit()
        store.upload_checkpoint(tmp_path / layout.step_dir_name(step), manifest)
    assert store.apply_retention(2) == [2]
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert lagging in keys


def test_restore_never_commits_a_complete_set_whose_bytes_do_not_verify(
    s3_server: LocalS3, bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    """Found by the two-node stale-part scenario: restore committed a planted set of
    parts (claiming every rank) before reading a byte of it."""
    prefix = f"spot-runs/{RUN}/checkpoints/{layout.step_dir_name(30)}/"
    bogus = {
        "format": "spot-checkpoint/1",
        "run_id": RUN,
        "step": 30,
        "created_at": "2026-01-01T00:00:00Z",
        "reason": "periodic",
        "files": [{"path": "model.pt", "size": 5, "sha256": "0" * 64}],
        "ranks": [0, 1],
        "world_size": 2,
        "incarnation": "run-1-s0-a9",
    }
    s3_client.put_object(
        Bucket=bucket, Key=prefix + "parts/run-1-s0-a9/i-x.json", Body=json.dumps(bogus)
    )
    s3_client.put_object(Bucket=bucket, Key=prefix + "model.pt", Body=b"stale")
    store = node_store(s3_server, bucket, "node-c")
    with capture_logs() as logs:
        assert store.restore_newest(tmp_path / "c") is None
    assert events(logs, "restore_skipped")
    assert not events(logs, "global_checkpoint_committed")
    assert store.list_committed() == []
