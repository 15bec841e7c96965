"""Two instances, one run (issue 12): torchrun across two simulated nodes on loopback.

Each node is what an instance would be: its own metadata emulator (its own instance id),
local dir, runtime dir and `spot-supervisor run`. They share one bucket (moto over HTTP)
and one c10d store started here, off the "spot fleet", as the README recommends. The
command is `torchrun --nnodes=2 --nproc-per-node=1 ... -m trainer.example`. Every
scenario ends with the final hash of an uninterrupted two-node run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from instances import Instances, kill_instance, process_env

from daemon.standins import LocalS3
from daemon.standins.demo import SupervisorProcess
from daemon.standins.emulator import MetadataEmulator

pytestmark = pytest.mark.slow

RUN_ID = "two-node"
STEPS, SAVE_EVERY, STEP_SECONDS = 30, 5, 0.15
FINAL_RE = re.compile(r"^final_params_sha256=([0-9a-f]{64})$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-conf=is_host=false,join_timeout=120",
        "--max-restarts=0",
        *extra,
        "-m",
        "trainer.example",
        "--steps",
        str(STEPS),
        "--save-every",
        str(SAVE_EVERY),
        "--step-seconds",
        str(STEP_SECONDS),
    ]


@pytest.fixture
def rdzv_store() -> Iterator[int]:
    """The c10d store every incarnation rendezvouses on; it outlives every node."""
    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    yield port
    del store


@pytest.fixture(scope="module")
def reference_hash(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two torchruns, never interrupted, no supervisor: the hash every scenario must end with."""
    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    root = tmp_path_factory.mktemp("reference")
    procs = []
    for n in range(2):
        env = {
            **os.environ,
            "SPOT_CHECKPOINT_DIR": str(root / f"n{n}"),
            "SPOT_RUN_ID": RUN_ID,
            "PET_RDZV_ID": "reference",
        }
        procs.append(
            subprocess.Popen(
                [*torchrun(port), "--step-seconds", "0"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=240)[0] for p in procs]
    del store
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    hashes = [m.group(1) for o in outs for ln in o.splitlines() if (m := FINAL_RE.match(ln))]
    assert len(hashes) == 1, "\n".join(outs)
    return hashes[0]


class Cluster(Instances):
    """Nodes of one two-node run: every boot is a new instance with `run.nodes = 2`."""

    def boot(  # type: ignore[override]
        self, name: str, **daemon: Any
    ) -> tuple[SupervisorProcess, MetadataEmulator]:
        return super().boot(name, run={"nodes": 2}, **daemon)


@pytest.fixture
def cluster(tmp_path: Path, s3_server: LocalS3, bucket: str, rdzv_store: int) -> Iterator[Cluster]:
    c = Cluster(tmp_path, s3_server.endpoint_url, bucket, RUN_ID, torchrun(rdzv_store))
    yield c
    c.close()


def final_hashes(*sups: SupervisorProcess) -> list[str]:
    return [m.group(1) for s in sups for ln in s.lines if (m := FINAL_RE.match(ln))]


def committed(s3_client: Any, bucket: str) -> dict[int, dict[str, Any]]:
    prefix = f"runs/{RUN_ID}/checkpoints/"
    out = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            if o["Key"].endswith("/manifest.json") and "/parts/" not in o["Key"]:
                doc = json.loads(s3_client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
                out[doc["step"]] = doc
    return out


def has_complete(s3_client: Any, bucket: str) -> bool:
    key = f"runs/{RUN_ID}/complete.json"
    return bool(s3_client.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents"))


def first_commit(*sups: SupervisorProcess, timeout: float = 120) -> dict[str, Any]:
    """The first global commit, by whichever node made it: the node whose part of a step
    goes up last commits that step, so one node may see none of them."""

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for sup in sups:
            found = sup.find("global_checkpoint_committed") + [
                e for e in sup.find("checkpoint_committed") if e.get("step", 0) > 0
            ]
            if found:
                return found[0]
        time.sleep(0.1)
    tails = "\n---\n".join("\n".join(sup.lines[-30:]) for sup in sups)
    raise AssertionError(f"timed out waiting for a first global commit; last output:\n{tails}")


def rank0_node(sup_a: SupervisorProcess, sup_b: SupervisorProcess) -> SupervisorProcess:
    """The supervisor whose trainer prints (rank 0's node, where progress lines appear)."""
    for s in (sup_a, sup_b):
        if any(ln.startswith(("start step=", "resumed step=")) for ln in s.lines):
            return s
    raise AssertionError("neither node's trainer printed a start line")


def finish(survivors: list[SupervisorProcess], s3_client: Any, bucket: str, reference: str) -> None:
    for s in survivors:
        assert s.wait_exit(300) == 0, "\n".join(s.lines[-40:])
    assert final_hashes(*survivors) == [reference]
    manifests = committed(s3_client, bucket)
    assert manifests[max(manifests)]["reason"] == "final"
    assert manifests[max(manifests)]["ranks"] == [0, 1]
    assert has_complete(s3_client, bucket)


def notice(emulator: MetadataEmulator, seconds: float = 60) -> None:
    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    emulator.set_notice("terminate", at)


# --- scenarios -----------------------------------------------------------------------------


def restarted(sup: SupervisorProcess, timeout: float = 120) -> dict[str, Any]:
    """The next start of the training command after the first one."""
    first = sup.find("child_started")[0]["pid"]
    return sup.wait_for(
        lambda e: e.get("event") == "child_started" and e.get("pid") != first,
        timeout,
        "a restart of the training command",
    )


@pytest.mark.parametrize("where", ["without_rank_0", "with_rank_0"])
def test_notice_on_one_node_the_survivor_rejoins_the_replacement(
    where: str, cluster: Cluster, s3_client: Any, bucket: str, reference_hash: str
) -> None:
    a, ea = cluster.boot("a")
    b, eb = cluster.boot("b")
    first_commit(a, b)
    rank0 = rank0_node(a, b)
    noticed = rank0 if where == "with_rank_0" else (b if rank0 is a else a)
    survivor = b if noticed is a else a
    notice(ea if noticed is a else eb)
    assert noticed.wait_exit(120) == 0, "\n".join(noticed.lines[-40:])
    emergency = noticed.find("emergency_committed")
    assert emergency, "\n".join(noticed.lines[-40:])
    # The interrupt step is globally committed: both nodes' parts, either wrote it.
    step = emergency[0]["committed_step"]
    assert committed(s3_client, bucket)[step]["reason"] == "interrupt"
    stopped = survivor.wait_for(
        lambda e: e.get("event") == "trainer_stopped_elsewhere", 60, "the survivor's stop"
    )
    assert stopped["step"] == step
    restarted(survivor)  # waits in rendezvous for a replacement, on its own disk
    replacement, _ = cluster.boot("c")
    finish([survivor, replacement], s3_client, bucket, reference_hash)
    ids = [e["rdzv_id"] for e in survivor.find("rendezvous_id_chosen")]
    assert len(ids) == 2 and ids[1] == f"{RUN_ID}-s{step}-a0"
    assert [e["rdzv_id"] for e in replacement.find("rendezvous_id_chosen")] == ids[1:]
    assert not replacement.find("multipart_uploads_aborted") or all(
        e["aborted"] == 0 for e in replacement.find("multipart_uploads_aborted")
    )


def test_a_node_killed_without_notice_is_replaced(
    cluster: Cluster, s3_client: Any, bucket: str, reference_hash: str
) -> None:
    a, _ = cluster.boot("a")
    b, _ = cluster.boot("b")
    first_commit(a, b)
    kill_instance(b)  # no notice, no release, no emergency commit
    restarted(a)  # its ranks crashed with the peer; it rejoins from the global commit
    assert a.find("phase_changed") and [e for e in a.events if e.get("phase") == "backoff"], (
        "the survivor's trainer did not fail with its peer"
    )
    replacement, _ = cluster.boot("c")
    finish([a, replacement], s3_client, bucket, reference_hash)


def test_both_nodes_get_notices_at_once(
    cluster: Cluster, s3_client: Any, bucket: str, reference_hash: str
) -> None:
    a, ea = cluster.boot("a")
    b, eb = cluster.boot("b")
    first_commit(a, b)
    notice(ea)
    notice(eb)
    assert a.wait_exit(120) == 0 and b.wait_exit(120) == 0
    steps = {a.find("emergency_committed")[0]["committed_step"]}
    steps.add(b.find("emergency_committed")[0]["committed_step"])
    assert len(steps) == 1  # one global commit of the interrupt step, from both parts
    c, _ = cluster.boot("c")
    d, _ = cluster.boot("d")
    finish([c, d], s3_client, bucket, reference_hash)


def test_a_stale_part_of_an_earlier_incarnation_never_mixes_in(
    cluster: Cluster, s3_client: Any, bucket: str, reference_hash: str
) -> None:
    step = 2 * SAVE_EVERY
    prefix = f"runs/{RUN_ID}/checkpoints/step-{step:09d}/"
    stale = {
        "format": "spot-checkpoint/1",
        "run_id": RUN_ID,
        "step": step,
        "created_at": "2026-01-01T00:00:00Z",
        "reason": "periodic",
        "files": [{"path": "stale-only.pt", "size": 5, "sha256": "0" * 64}],
        "ranks": [0, 1],
        "world_size": 2,
        "incarnation": f"{RUN_ID}-s0-a9",
    }
    # A complete set on its own (ranks 0 and 1), from an incarnation that is not running.
    s3_client.put_object(
        Bucket=bucket, Key=prefix + f"parts/{RUN_ID}-s0-a9/i-old.json", Body=json.dumps(stale)
    )
    s3_client.put_object(Bucket=bucket, Key=prefix + "stale-only.pt", Body=b"stale")
    a, _ = cluster.boot("a")
    b, _ = cluster.boot("b")
    finish([a, b], s3_client, bucket, reference_hash)
    done = [e for s in (a, b) for e in s.find("global_checkpoint_committed") if e["step"] == step]
    assert done and done[0]["incarnation"] == f"{RUN_ID}-s0-a0"


def test_a_crash_loop_from_one_committed_step_still_rendezvouses(
    cluster: Cluster, s3_client: Any, bucket: str, reference_hash: str
) -> None:
    a, _ = cluster.boot("a", max_restarts=5)
    b, _ = cluster.boot("b", max_restarts=5)
    first_commit(a, b)
    for attempt in (1, 2):
        # Every rank dies at once (an OOM, a bad node), twice in a row.
        for sup in (a, b):
            wait_workers(sup)
        for sup in (a, b):
            kill_workers(sup)
        for sup in (a, b):
            sup.wait_for(
                lambda e, sup=sup, n=attempt: (
                    e.get("event") == "rendezvous_id_chosen"
                    and len(sup.find("rendezvous_id_chosen")) > n
                ),
                120,
                f"incarnation {attempt + 1}",
            )
    finish([a, b], s3_client, bucket, reference_hash)
    ids_a = [e["rdzv_id"] for e in a.find("rendezvous_id_chosen")]
    ids_b = [e["rdzv_id"] for e in b.find("rendezvous_id_chosen")]
    assert ids_a == ids_b and len(set(ids_a)) == len(ids_a) >= 3  # agreed, never reused


def wait_workers(sup: SupervisorProcess, timeout: float = 120) -> None:
    """Until the training ranks of this node run (past torchrun's rendezvous)."""
    import time

    assert sup.proc is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        kids = psutil.Process(sup.proc.pid).children(recursive=True)
        if any("LOCAL_RANK" in process_env(p) for p in kids):
            return
        time.sleep(0.2)
    raise AssertionError("the training ranks never started")


def kill_workers(sup: SupervisorProcess) -> None:
    """SIGKILL the training ranks (not the agent, not the supervisor)."""
    assert sup.proc is not None
    for p in psutil.Process(sup.proc.pid).children(recursive=True):
        if "LOCAL_RANK" in process_env(p):
            with contextlib.suppress(psutil.Error):
                p.kill()
