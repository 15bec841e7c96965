"""Background saves, sharded files, the AMP scaler and deadline awareness, in-process.

Real torch objects, real files and real threads; nothing is mocked. No assertion is
about time: the stall is the benchmark's business (``python -m bench stall``).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from daemon.layout import list_step_dirs, load_complete, parse_tmp_dir
from trainer import CheckpointError, CheckpointManager
from trainer.shards import assemble, files_for, is_index
from trainer.snapshot import SnapshotPool

MiB = 1 << 20


class Blob:
    """Tracked state holding a few tensors of chosen sizes (a stand-in for big weights)."""

    def __init__(self, seed: int, sizes: tuple[int, ...] = (MiB // 4, 3 * MiB // 4 + 5, 10)):
        g = torch.Generator().manual_seed(seed)
        self.tensors = OrderedDict(
            (f"t{i}", torch.randn(n, generator=g)) for i, n in enumerate(sizes)
        )
        self.tensors["matrix"] = torch.randn(300, 700, generator=g)  # 840 KB, 2-D
        self.tensors["half"] = torch.randn(5, generator=g).half()
        self.count = 7

    def state_dict(self) -> dict[str, Any]:
        """Tensors and a counter, as a module plus a bit of bookkeeping would give."""
        return {"tensors": self.tensors, "count": self.count, "shape": (3, 4)}

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Take the saved values."""
        self.tensors = state_dict["tensors"]
        self.count = state_dict["count"]


def _manager(d: Path, **kw: Any) -> CheckpointManager:
    return CheckpointManager(d, run_id="test", handle_signals=False, **kw)


def _tmp_dirs(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if parse_tmp_dir(p.name) is not None]


def _zip_members(path: Path) -> dict[str, bytes]:
    # torch.save puts a random serialization id into every file it writes, so two
    # saves of one state never hash alike; everything else must be identical.
    with zipfile.ZipFile(path) as z:
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist() if "serialization_id" not in n}


def test_snapshot_copies_keep_views_sharing_and_metadata_and_reuse_buffers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    state = model.state_dict()
    base = torch.arange(20.0)
    state["view"] = base[5:15].view(2, 5)  # a view with an offset
    state["same"] = base  # shares the view's storage
    pool = SnapshotPool()
    copy, ready = pool.copy(state)
    ready()
    assert copy._metadata == state._metadata  # what load_state_dict uses for versions
    assert copy["view"].storage_offset() == 5 and copy["view"].stride() == (5, 1)
    assert copy["view"].untyped_storage().data_ptr() == copy["same"].untyped_storage().data_ptr()
    for k, v in state.items():
        assert torch.equal(copy[k], v) and copy[k].data_ptr() != v.data_ptr(), k
    base.add_(1)  # training moves on: the copy does not
    assert copy["same"][0].item() == 0.0
    first = {k: v.untyped_storage().data_ptr() for k, v in copy.items()}
    copy2, _ = pool.copy(state)
    assert {k: v.untyped_storage().data_ptr() for k, v in copy2.items()} == first
    assert copy2["same"][0].item() == 1.0


def test_async_save_writes_what_a_sync_save_writes(tmp_path: Path) -> None:
    blob_a, blob_b = Blob(1), Blob(1)
    sync = _manager(tmp_path / "sync", save_every=5, async_save=False, shard_bytes=MiB)
    background = _manager(tmp_path / "async", save_every=5, shard_bytes=MiB)
    sync.track(blob=blob_a)
    background.track(blob=blob_b)
    expected = {k: v.clone() for k, v in blob_b.tensors.items()}
    torch.manual_seed(4)
    assert sync.step_done(5, epoch=1) is False
    torch.manual_seed(4)
    assert background.step_done(5, epoch=1) is False
    # The loop goes on at once and changes the live tensors; the checkpoint must not.
    for t in blob_b.tensors.values():
        t.mul_(-1)
    manifest = background.wait()
    assert manifest is not None and manifest.step == 5
    sync_m = load_complete(tmp_path / "sync" / "step-000000005")
    assert [(f.path, f.size) for f in manifest.files] == [(f.path, f.size) for f in sync_m.files]
    for f in manifest.files:
        assert _zip_members(tmp_path / "async" / "step-000000005" / f.path) == _zip_members(
            tmp_path / "sync" / "step-000000005" / f.path
        ), f.path
    restored = Blob(9)
    _manager(tmp_path / "async").restore(blob=restored)
    for k, v in expected.items():
        assert torch.equal(restored.tensors[k], v), k
    sync.close()
    background.close()


def test_large_state_is_written_as_several_files_and_loads_back(tmp_path: Path) -> None:
    blob = Blob(2, sizes=(MiB // 4, 3 * MiB // 4 + 5, 10, 700_001))
    ckpt = _manager(tmp_path, shard_bytes=MiB)
    ckpt.track(blob=blob)
    manifest = ckpt.save(3, ckpt.snapshot(3), "periodic")
    names = [f.path for f in manifest.files]
    shard_files = [n for n in names if n.startswith("blob-")]
    assert len(shard_files) >= 4, names
    assert "blob.pt" in names
    for f in manifest.files:
        if f.path in shard_files:
            assert f.size <= MiB + 64 * 1024, f  # the shard bound, plus zip framing
    # The 3 MiB tensor is cut into pieces; reassembly gives it back bit for bit.
    restored = Blob(5, sizes=(1, 1, 1, 1))
    resume = _manager(tmp_path).restore(blob=restored)
    assert resume.step == 3 and restored.count == 7
    assert list(restored.tensors) == list(blob.tensors)
    assert isinstance(restored.tensors, OrderedDict)
    for k, v in blob.tensors.items():
        got = restored.tensors[k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k


def test_shards_keep_state_dict_metadata_and_a_key_named_like_a_shard(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(300, 300), nn.BatchNorm1d(300))
    parts = files_for("model", model.state_dict(), 100_000)
    index = torch.load(io.BytesIO(_saved(parts[-1][1]())), weights_only=True)
    assert is_index(index)
    shards_by_name = {name: _saved(make()) for name, make in parts[:-1]}
    back = assemble(index, lambda n: torch.load(io.BytesIO(shards_by_name[n]), weights_only=True))
    assert back._metadata == model.state_dict()._metadata
    nn.Sequential(nn.Linear(300, 300), nn.BatchNorm1d(300)).load_state_dict(back)

    # "x-00000" is a key of its own, next to an unsharded "x": both load as themselves.
    ckpt = _manager(tmp_path, shard_bytes=MiB)
    ckpt.save(1, {"x": {"a": torch.ones(3)}, "x-00000": {"b": torch.zeros(2)}}, "periodic")
    loaded = _manager(tmp_path).load_latest()
    assert loaded is not None
    assert torch.equal(loaded.state["x"]["a"], torch.ones(3))
    assert torch.equal(loaded.state["x-00000"]["b"], torch.zeros(2))
    # ...but not when "x" itself is large enough to be sharded into that name.
    with pytest.raises(ValueError, match=r"both write x-00000\.pt"):
        ckpt.save(2, {"x": torch.ones(MiB), "x-00000": torch.ones(1)}, "periodic")


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_one_save_in_flight_periodic_saves_wait_and_none_is_lost(tmp_path: Path) -> None:
    seen: list[tuple[int, str, bool]] = []
    main = threading.current_thread()

    def on_save(m: Any) -> None:
        seen.append((m.step, m.reason, threading.current_thread() is main))

    ckpt = _manager(tmp_path, keep=None, save_every=1, on_save=on_save)
    ckpt.track(blob=Blob(3))
    for step in range(1, 6):
        assert ckpt.step_done(step) is False
        assert ckpt.latest_step == step  # written or being written
    ckpt.request_stop()
    # Step 5 is saved or being saved: SIGTERM there writes nothing new, and waits.
    assert ckpt.step_done(5) is True
    assert ckpt.in_flight_step is None
    assert seen == [(s, "periodic", True) for s in range(1, 6)]
    assert [s for s, _ in list_step_dirs(tmp_path)] == [5, 4, 3, 2, 1]
    assert _tmp_dirs(tmp_path) == []


def test_interrupt_save_waits_for_the_one_in_flight(tmp_path: Path) -> None:
    seen: list[tuple[int, str]] = []
    ckpt = _manager(tmp_path, save_every=4, on_save=lambda m: seen.append((m.step, m.reason)))
    ckpt.track(blob=Blob(4, sizes=(2 * MiB,)))
    assert ckpt.step_done(4) is False  # periodic, in the background
    ckpt.request_stop()
    assert ckpt.step_done(5) is True
    assert seen == [(4, "periodic"), (5, "interrupt")]
    assert {load_complete(p).reason for _, p in list_step_dirs(tmp_path)} == {
        "periodic",
        "interrupt",
    }
    assert _tmp_dirs(tmp_path) == []


def test_a_stop_during_the_buffers_warm_up_saves_without_waiting_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The warm-up (the snapshot buffers, allocated at the first boundary) is held until
    # the test lets it go, as a big state's would be still touching its pages when an
    # early notice comes. The interrupt save must not wait for it, and it must be told
    # to touch no more.
    entered, gate, finished = threading.Event(), threading.Event(), threading.Event()
    told_to_stop: list[bool] = []
    allocate = SnapshotPool.allocate

    def held(self: SnapshotPool, sizes: Any, stop: threading.Event | None = None) -> bool:
        entered.set()
        gate.wait(10)
        told_to_stop.append(stop is not None and stop.is_set())
        try:
            return allocate(self, sizes, stop)
        finally:
            finished.set()

    monkeypatch.setattr(SnapshotPool, "allocate", held)
    ckpt = _manager(tmp_path, save_every=1000)
    ckpt.track(blob=Blob(6, sizes=(2 * MiB,)))
    assert ckpt.step_done(1) is False  # nothing due: the warm-up starts
    assert entered.wait(30)
    ckpt.request_stop()
    assert ckpt.step_done(2) is True
    assert not finished.is_set()  # saved while the warm-up still had not finished
    assert [(s, load_complete(p).reason) for s, p in list_step_dirs(tmp_path)] == [(2, "interrupt")]
    gate.set()
    ckpt.close()  # joins the warm-up
    assert told_to_stop == [True]
    assert ckpt._saves._pool.nbytes == 0  # it stopped before touching any buffer


def test_snapshot_buffers_stop_being_touched_when_told(monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.snapshot as snapshot

    monkeypatch.setattr(snapshot, "TOUCH_CHUNK", MiB)
    stop = threading.Event()
    pool = SnapshotPool()
    assert pool.allocate([(3 * MiB, False), (MiB, False)], stop) is True
    assert pool.nbytes == 4 * MiB  # not told: every buffer
    stop.set()
    fresh = SnapshotPool()
    assert fresh.allocate([(3 * MiB, False), (MiB, False)], stop) is False
    assert fresh.nbytes == 0
    # Buffers already held of the right size are kept whatever the stop says.
    assert pool.allocate([(3 * MiB, False), (2 * MiB, False)], stop) is False
    assert pool.nbytes == 3 * MiB
    assert pool.allocate([(3 * MiB, False)], stop) is True  # all held already


def test_close_joins_the_save_in_flight(tmp_path: Path) -> None:
    with _manager(tmp_path, save_every=2) as ckpt:
        ckpt.track(blob=Blob(5))
        ckpt.step_done(2)
    assert [s for s, _ in list_step_dirs(tmp_path)] == [2]
    assert _tmp_dirs(tmp_path) == []


def test_grad_scaler_state_roundtrips(tmp_path: Path) -> None:
    def parts() -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=6)
        return model, opt, scaler

    def train(model: nn.Module, opt: Any, scaler: torch.amp.GradScaler, steps: int) -> None:
        for i in range(steps):
            opt.zero_grad()
            loss = model(torch.randn(3, 4)).pow(2).mean()
            if i == 1:
                loss = loss * float("inf")  # an overflow: the scale backs off
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    model, opt, scaler = parts()
    train(model, opt, scaler, 5)
    ckpt = _manager(tmp_path)
    ckpt.restore(model, opt, scaler=scaler)
    ckpt.save(5, ckpt.snapshot(5), "periodic")
    saved = scaler.state_dict()
    # It moved (backed off, then counted good steps): the roundtrip carries real state.
    assert (saved["scale"], saved["_growth_tracker"]) == (2.0**9, 3)
    train(model, opt, scaler, 4)

    model2, opt2, scaler2 = parts()
    assert scaler2.state_dict() != saved
    _manager(tmp_path).restore(model2, opt2, scaler=scaler2)
    assert scaler2.state_dict() == saved
    train(model2, opt2, scaler2, 4)
    assert scaler2.state_dict() == scaler.state_dict()
    assert scaler.get_scale() == 2.0**8  # the inf in the second run backed off again
    assert torch.equal(model2.weight, model.weight)


def _notice(path: Path, seconds_from_now: float) -> None:
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds_from_now)
    doc = {"action": "terminate", "deadline": when.isoformat(), "source": "aws-imds"}
    path.write_text(json.dumps(doc))


def test_a_save_the_deadline_leaves_no_time_for_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notice = tmp_path / "notice.json"
    ckdir = tmp_path / "c"
    ckpt = _manager(ckdir, save_every=5, notice_file=notice, deadline_margin=1.0)
    ckpt.track(blob=Blob(6))
    ckpt.step_done(5)
    ckpt.wait()
    assert ckpt.last_save_seconds is not None  # the prior save's duration is known
    _notice(notice, -1.0)  # the deadline has passed: no save can finish before it
    ckpt.request_stop()
    caplog.set_level(logging.WARNING, logger="trainer.checkpoint")
    assert ckpt.step_done(7) is True
    assert ckpt.skipped_step == 7
    assert [s for s, _ in list_step_dirs(ckdir)] == [5]
    assert _tmp_dirs(ckdir) == []
    [line] = [r.getMessage() for r in caplog.records if "deadline is" in r.getMessage()]
    assert "save_skipped" in line and "step 7" in line and "last save took" in line

    # A new process knows the last save's duration from its manifest.
    again = _manager(ckdir, notice_file=notice, deadline_margin=1.0)
    again.restore(blob=Blob(0))
    assert again.last_save_seconds == pytest.approx(
        load_complete(ckdir / "step-000000005").extra["save_seconds"]
    )
    # With time to spare, the interrupt save is made.
    _notice(notice, 3600)
    again.request_stop()
    assert again.step_done(8) is True
    assert again.skipped_step is None
    assert load_complete(ckdir / "step-000000008").reason == "interrupt"


def test_a_failed_background_save_is_reported_and_leaves_nothing(tmp_path: Path) -> None:
    ckdir = tmp_path / "c"
    ckpt = _manager(ckdir, save_every=2)
    ckpt.track(blob=Blob(7))
    # A file where the temporary directory's parent should be: the background mkdir
    # fails for real (an OSError, as a full disk or a lost mount would give).
    (tmp_path / "not-a-dir").write_text("x")
    ckpt.directory = tmp_path / "not-a-dir" / "c"
    assert ckpt.step_done(2) is False
    # The next save waits for this one, so its failure is reported here at the latest
    # (a step_done in between reports it as soon as it has happened).
    with pytest.raises(CheckpointError, match=r"background save of checkpoint step-000000002"):
        for step in (3, 4):
            ckpt.step_done(step)
    assert ckpt.latest_step is None  # step 2 is not counted as saved
    ckpt.directory = ckdir
    assert list(ckdir.iterdir()) == []
    ckpt.step_done(4)
    ckpt.wait()
    ckpt.directory = tmp_path / "not-a-dir" / "c"
    ckpt.step_done(6)
    with pytest.raises(CheckpointError, match=r"step-000000006 \(reason periodic\) failed"):
        ckpt.close()
    assert [s for s, _ in list_step_dirs(ckdir)] == [4]
    assert _tmp_dirs(ckdir) == []
