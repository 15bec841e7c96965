"""Several nodes, one run (issue 12), simulated on one machine with gloo on CPU.

Each simulated node is a torchrun agent (``--nnodes=2``, c10d rendezvous on a TCPStore
this test hosts, as a real job would on some reachable host) with a checkpoint
directory of its own, as each instance's supervisor gives it. Each node commits its own
``step-*`` directory holding only its files; a SIGTERM to one node's worker stops every
rank on every node at the same step; once the node parts of a step are put together in
every node's directory (what each supervisor restores from the global commit), a new
pair of agents resumes and ends with the parameters of a run never interrupted.

The sharded test runs FSDP2 (``fully_shard`` on a CPU mesh, gloo) over three ranks on
two nodes (two ranks on the first: a leader and a rank that is not), saving through
DCP every step, in the background.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist
from followed import Followed
from test_trainer_harness import FINAL_RE, REPO, START_RE, STOPPED_RE, TORCHRUN, tmp_dirs

from daemon.layout import (
    CheckpointWriter,
    Manifest,
    list_step_dirs,
    load_complete,
    parse_tmp_dir,
    step_dir_name,
)

pytestmark = pytest.mark.slow

RUN_ID = "test-run"
ARGS = ["--steps", "24", "--save-every", "5", "--seed", "5"]
WORKER = str(REPO / "tests" / "sharded_worker.py")


@pytest.fixture(scope="module")
def store() -> Iterator[dist.TCPStore]:
    """The rendezvous store both agents of a job meet on; it outlives every agent."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield server
    del server


def restore_global(node_dirs: list[Path], step: int) -> Manifest:
    """What every node's supervisor does before a start, from the run's global commit.

    The node parts of ``step`` (each node's ``step-*`` directory) become one checkpoint
    holding every node's files, with one manifest listing all of them and the keys the
    supervisors' merge writes (``ranks`` listing every rank, ``world_size``, ``nodes``,
    ``incarnation``); it replaces each node's own part in every node's directory.
    """
    name = step_dir_name(step)
    parts = [load_complete(d / name) for d in node_dirs]
    files: dict[str, bytes] = {}
    for d, part in zip(node_dirs, parts, strict=True):
        for f in part.files:
            assert f.path not in files, f"{f.path} is in two node parts"
            files[f.path] = (d / name / f.path).read_bytes()
    world = parts[0].extra["world_size"]
    ranks = sorted(r for part in parts for r in part.extra["ranks"])
    assert ranks == list(range(world)), ranks
    assert len({part.reason for part in parts}) == 1
    incarnations = {part.extra.get("incarnation") for part in parts}
    assert len(incarnations) == 1, incarnations  # parts of one start only
    extra = {
        "world_size": world,
        "ranks": ranks,
        "nodes": sorted(str(part.extra["node"]) for part in parts),
        "incarnation": incarnations.pop(),
    }
    manifest: Manifest | None = None
    for d in node_dirs:
        shutil.rmtree(d / name)  # the node's part, set aside
        with CheckpointWriter(d, parts[0].run_id, step, parts[0].reason, extra) as w:
            for path, data in sorted(files.items()):
                w.add_bytes(path, data)
            manifest = w.commit()
    assert manifest is not None
    return manifest


class Pair(Followed):
    """Two torchrun agents, one per simulated node, of one two-node job.

    Only global rank 0 prints (trainer.example), so the lines followed are those of
    whichever agent the rendezvous gave rank 0.
    """

    def __init__(self, base: Path, port: int, rdzv_id: str, *args: str) -> None:
        super().__init__()
        self.dirs = [base / "node-a", base / "node-b"]
        self.procs: list[subprocess.Popen[str]] = []
        self.stderr: list[Path] = []
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ)
            for name in ("SPOT_NOTICE_FILE", "PET_RDZV_ID"):
                env.pop(name, None)
            env.update(
                SPOT_CHECKPOINT_DIR=str(d),
                SPOT_RUN_ID=RUN_ID,
                OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1",
            )
            err = base / f"stderr-{d.name}-{rdzv_id}.log"
            self.stderr.append(err)
            with open(err, "wb") as f:
                proc = subprocess.Popen(
                    [
                        TORCHRUN,
                        "--nnodes=2",
                        "--nproc-per-node=1",
                        "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=127.0.0.1:{port}",
                        f"--rdzv-id={rdzv_id}",
                        "--rdzv-conf=is_host=false",
                        "-m",
                        "trainer.example",
                        "--device",
                        "cpu",
                        *args,
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=f,
                    text=True,
                )
            self.procs.append(proc)
            self.follow(proc)

    def ended(self, pattern: re.Pattern[str]) -> None:
        """One agent's stdout ended; rank 0's may still be going."""

    def rank_pid(self, rank: int) -> int:
        """The pid of the worker of global ``rank``, on whichever node it is."""
        for proc in self.procs:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == str(rank):
                        return child.pid
                except psutil.NoSuchProcess:
                    continue
        pytest.fail(f"no worker of rank {rank}\n{self.report()}")

    def finish(self, timeout: float = 90) -> list[int]:
        """Both agents' exit statuses."""
        return [p.wait(timeout=timeout) for p in self.procs]

    def report(self) -> str:
        tails = [f"stderr {p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in self.stderr]
        return "stdout:\n" + "\n".join(self.lines[-30:]) + "\n" + "\n".join(tails)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                for child in psutil.Process(p.pid).children(recursive=True):
                    child.kill()
                p.kill()
                p.wait(timeout=30)


def _node_manifests(dirs: list[Path], step: int) -> dict[int, tuple[Path, Manifest]]:
    """The node part of ``step`` in each directory, keyed by the lowest rank it holds."""
    found = {}
    for d in dirs:
        m = load_complete(d / step_dir_name(step))
        found[min(m.extra["ranks"])] = (d, m)
    return found


def test_two_nodes_save_per_node_stop_together_and_resume(
    tmp_path: Path, store: dist.TCPStore
) -> None:
    reference = Pair(tmp_path / "reference", store.port, "reference", *ARGS)
    run = Pair(tmp_path / "run", store.port, "run-1", *ARGS, "--step-seconds", "0.05")
    try:
        assert run.wait_for(START_RE, timeout=120)[0] == "start step=0"
        run.wait_for(re.compile(r"^step=7 loss="))
        # Rank 1's worker only: not the node that holds rank 0, nor any agent.
        os.kill(run.rank_pid(1), signal.SIGTERM)
        stop = int(run.wait_for(STOPPED_RE)[1])
        assert run.finish() == [0, 0], run.report()
        expected = reference.wait_for(FINAL_RE, timeout=180)[1]
        assert reference.finish() == [0, 0], reference.report()
    finally:
        run.kill()
        reference.kill()
    assert stop >= 7

    # Each node saved the stop step, as an interrupt, in its own directory.
    nodes = _node_manifests(run.dirs, stop)
    assert sorted(nodes) == [0, 1]
    m0, m1 = nodes[0][1], nodes[1][1]
    for m, ranks in ((m0, [0]), (m1, [1])):
        assert m.reason == "interrupt"
        assert m.extra["ranks"] == ranks and m.extra["world_size"] == 2
    assert {m0.extra["node"], m1.extra["node"]} == {"0", "1"}  # torchrun's GROUP_RANK
    assert m0.extra["incarnation"] == m1.extra["incarnation"] == "run-1"  # the rdzv id
    names0, names1 = {f.path for f in m0.files}, {f.path for f in m1.files}
    # Replicated state on rank 0's node only; the other node holds rank 1's own state.
    assert {"model.pt", "optimizer.pt", "scheduler.pt", "progress.pt", "rng.pt"} <= names0
    assert not any("rank00001" in n for n in names0), names0
    assert names1 == {"rng-rank00001.pt"}
    for d in run.dirs:
        assert max(s for s, _ in list_step_dirs(d)) == stop
        assert tmp_dirs(d) == []
        # The periodic saves before the stop were per node too.
        assert load_complete(d / step_dir_name(5)).reason == "periodic"

    # A node part alone is no resume point: the supervisors' global commit is.
    restore_global(run.dirs, stop)
    last = Pair(tmp_path / "run", store.port, "run-2", *ARGS)
    try:
        assert last.wait_for(START_RE, timeout=120)[0] == f"resumed step={stop} reason=interrupt"
        final = last.wait_for(FINAL_RE, timeout=120)[1]
        assert last.finish() == [0, 0], last.report()
    finally:
        last.kill()
    assert final == expected
    for d in run.dirs:
        assert load_complete(d / step_dir_name(24)).reason == "final"


def _workers(base: Path, mode: str, *args: str) -> list[dict[str, object]]:
    """Three ranks on two nodes (ranks 0 and 1 on node 0, rank 2 on node 1); their reports."""
    port = _free_port()
    procs, outs, errs = [], [], []
    for rank, node in ((0, 0), (1, 0), (2, 1)):
        env = dict(os.environ)
        for name in ("SPOT_NOTICE_FILE", "TORCHELASTIC_RUN_ID", "PET_RDZV_ID"):
            env.pop(name, None)
        env.update(
            RANK=str(rank),
            WORLD_SIZE="3",
            LOCAL_RANK=str(rank if node == 0 else 0),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GROUP_RANK=str(node),
            SPOT_CHECKPOINT_DIR=str(base / f"node-{node}"),
            SPOT_RUN_ID=RUN_ID,
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
        )
        out = base / f"{mode}-rank{rank}.json"
        err = base / f"{mode}-rank{rank}.log"
        outs.append(out)
        errs.append(err)
        with open(err, "wb") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, WORKER, mode, *args, str(out)],
                    cwd=REPO,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join(f"--- {e.name}\n{e.read_text(errors='replace')[-2500:]}" for e in errs)
    assert codes == [0, 0, 0], logs
    return [json.loads(o.read_text()) for o in outs]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fsdp2_sharded_state_saves_per_node_and_restores(tmp_path: Path) -> None:
    node0, node1 = tmp_path / "node-0", tmp_path / "node-1"
    saved = _workers(tmp_path, "save", "5")

    # keep=2 on each node, pruned by each node's leader (ranks 0 and 2), never rank 1.
    assert [r["prune_calls"] for r in saved] == [5, 0, 5]
    for d in (node0, node1):
        assert [s for s, _ in list_step_dirs(d)] == [5, 4]
        leftovers = [n for n in os.listdir(d) if n.startswith(".")]
        assert leftovers == [], leftovers  # no .tmp-step-*, no .dcp-scratch-*
    m0 = load_complete(node0 / step_dir_name(5))  # every sha256 checked
    m1 = load_complete(node1 / step_dir_name(5))
    assert m0.reason == m1.reason == "final"
    assert (m0.extra["ranks"], m0.extra["node"], m0.extra["world_size"]) == ([0, 1], "0", 3)
    assert (m1.extra["ranks"], m1.extra["node"], m1.extra["world_size"]) == ([2], "1", 3)
    assert "incarnation" not in m0.extra  # no torchrun, no rendezvous id
    names0, names1 = {f.path for f in m0.files}, {f.path for f in m1.files}
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= names0
    assert {"progress.pt", "rng.pt", "rng-rank00001.pt"} <= names0
    assert names1 == {"dcp/__2_0.distcp", "rng-rank00002.pt"}

    # A save failing on one rank of one node fails on every rank, naming it.
    for r in saved:
        assert "saving step-000000105 failed: rank 2 (node '1'): OSError" in str(
            r["failed_save"]
        ), r
    assert not (node0 / step_dir_name(105)).exists() and not (node1 / step_dir_name(105)).exists()

    # The global commit of step 4 restored on both nodes; step 5 stays each node's part
    # only (its global commit "never happened"): no rank can resume from it, so the
    # ranks agree on step 4.
    restore_global([node0, node1], 4)
    marker = node0 / step_dir_name(5) / "marker"  # not listed: the part stays complete
    marker.write_text("node 0's part of step 5, before the resume")
    resumed = _workers(tmp_path, "resume")
    for before, after in zip(saved, resumed, strict=True):
        assert after["resumed"] == 4
        hashes_before, hashes_after = before["hashes"], after["hashes"]
        assert isinstance(hashes_before, dict) and isinstance(hashes_after, dict)
        # Each rank's restored shards (parameters and AdamW state) are the saved ones.
        assert hashes_after["4"] == hashes_before["4"]
        assert hashes_after["4"] != hashes_before["0"]
    # Step 5 again, after node 1 dropped its old part (the worker does, after the
    # restore): node 0's old part was set aside, and both nodes wrote step 5 anew.
    assert not marker.exists()
    for d in (node0, node1):
        assert load_complete(d / step_dir_name(5)).reason == "final"
        assert [n for n in os.listdir(d) if parse_tmp_dir(n) is not None] == []


def test_sharded_state_without_process_group_and_a_hostile_metadata(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One process, no torch.distributed: DCP saves and loads through the manager too; a
    ``.metadata`` that would run code when unpickled makes its checkpoint unloadable."""
    import pickle

    import torch
    from torch import nn

    from trainer import CheckpointManager
    from trainer.sharded import ModelState

    def parts(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        return model, optimizer

    model, optimizer = parts(0)
    ckpt = CheckpointManager(tmp_path, handle_signals=False, async_save=False)
    ckpt.track_sharded(train=ModelState(model, optimizer))
    manifest = ckpt.save(3, ckpt.snapshot(3))
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "progress.pt"} <= {f.path for f in manifest.files}
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []

    model2, optimizer2 = parts(1)
    again = CheckpointManager(tmp_path, handle_signals=False)
    assert again.restore(sharded={"train": ModelState(model2, optimizer2)}).step == 3
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["exp_avg"], optimizer2.state[b]["exp_avg"])

    pwned = tmp_path.parent / "pwned"

    class Hostile:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {pwned}",))

    # Rewritten with a manifest that lists the new bytes: only the allowlist stands guard.
    step_dir = tmp_path / step_dir_name(3)
    payload = pickle.dumps(Hostile())
    files = {f.path: (step_dir / f.path).read_bytes() for f in manifest.files}
    files["dcp/.metadata"] = payload
    shutil.rmtree(step_dir)
    with CheckpointWriter(tmp_path, RUN_ID, 3, "periodic") as w:
        for path, data in sorted(files.items()):
            w.add_bytes(path, data)
        w.commit()
    model3, optimizer3 = parts(2)
    third = CheckpointManager(tmp_path, handle_signals=False)
    assert third.restore(sharded={"train": ModelState(model3, optimizer3)}).step == 0
    assert not pwned.exists()
    assert "posix.system is not allowed in a DCP .metadata" in caplog.text
