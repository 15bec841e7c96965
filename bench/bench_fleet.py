"""Several instances of one run, on this machine: a notice on one node of two (issue 12)
and the standby's handoff (issue 13).

Every instance is what ``tests/test_multinode.py`` and ``tests/test_standby.py`` boot
(:mod:`daemon.standins.instances`): a real ``spot-supervisor run`` with its own metadata
emulator (its own instance id), local dir and runtime dir, all sharing one bucket on moto
behind the AWS-like shaping of :mod:`bench.servers`. The notice is the emulator's
``instance-action`` (120 s ahead, as on AWS), timed from the moment it is published;
each supervisor polls every 0.2 s. Runs are stopped (SIGKILL, trainer included) as soon
as what is measured has happened. Two rows:

* multinode: notice -> the interrupt step committed, two nodes of ``torchrun --nnodes=2
  --nproc-per-node=1`` (one c10d store started here, off the "fleet") against the same
  trainer, flags and state on one node (``--nnodes=1``, the same store), interleaved in
  each repeat. Timed to the commit: ``global_checkpoint_committed`` for the interrupt
  step on either node, one node's ``checkpoint_committed``. The noticed node's
  ``emergency_committed`` comes later, after torchrun's agent has exited; those times
  are in ``extra``. The notice goes to rank 0's node, which holds the ``--state-mb``
  state as the single node does (the full run also times a notice on the other node).
* standby: a holder (``python -m trainer.example``, no torchrun) gets a rebalance
  recommendation and commits early; a second instance boots, finds the slot held,
  restores that and waits in standby; the holder gets the notice, commits, releases. The
  standby's ``slot_handoff``: ``handoff_seconds`` (the release to its trainer's start)
  against ``restore_seconds`` (its restore of that checkpoint), bound: handoff <=
  restore + 5 s.

Full: 64 MiB of state, three repeats (about 4 minutes on 2 cores). ``--quick``: 16 MiB,
one repeat, one-node-of-two noticed on rank 0's node only, and row 1 stops at the commit
(no ``emergency_committed``, which waits for torchrun's agent to exit).
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3

from bench.common import Context, Row
from bench.servers import Server, server
from daemon.standins.demo import Event, SupervisorProcess
from daemon.standins.emulator import MetadataEmulator
from daemon.standins.instances import Instances

POLL_INTERVAL_S = 0.2
NOTICE_LEAD_S = 120.0
STEP_SECONDS = 0.05
# No periodic save: the interrupt checkpoint (and, for the standby, one early commit) is
# the only transfer. The notice comes once rank 0 has printed this many steps.
NEVER = 100_000_000
WARM_STEPS = 10
HANDOFF_SLACK_S = 5.0  # issue 13: handoff <= restore + 5 s
TIMEOUT_S = 180.0


# -- helpers ---------------------------------------------------------------------------


def _boot(
    fleet: Instances, name: str, command: list[str], nodes: int = 1
) -> tuple[SupervisorProcess, MetadataEmulator]:
    """Boot one instance of ``fleet`` running ``command``, one of ``nodes`` of the run."""
    run = {"nodes": nodes, "env": {"OMP_NUM_THREADS": "1"}}
    return fleet.boot(name, command=command, run=run)


def _trainer_flags(state_mb: int) -> list[str]:
    return [
        "-m",
        "trainer.example",
        "--device=cpu",
        f"--steps={NEVER}",
        f"--save-every={NEVER}",
        f"--step-seconds={STEP_SECONDS}",
        f"--state-mb={state_mb}",
    ]


def _torchrun(port: int, nodes: int, state_mb: int, run_id: str) -> list[str]:
    # Several nodes: the supervisor names each incarnation's rendezvous (PET_RDZV_ID). One
    # node: it does not, and torchrun's default id ("none") is closed on the shared store
    # once the first run's agent exits, so the run names its own.
    own = [f"--rdzv-id={run_id}"] if nodes == 1 else []
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-conf=is_host=false,join_timeout=120",
        *own,
        "--max-restarts=0",
        *_trainer_flags(state_mb),
    ]


def _notice(emulator: MetadataEmulator) -> float:
    """Publish a terminate notice 120 s ahead; the monotonic time it was published."""
    t0 = time.monotonic()
    emulator.set_notice(
        "terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=NOTICE_LEAD_S)
    )
    return t0


def _event(sup: SupervisorProcess, name: str, what: str, **match: Any) -> Event:
    return sup.wait_for(
        lambda e: e.get("event") == name and all(e.get(k) == v for k, v in match.items()),
        TIMEOUT_S,
        what,
    )


def _training(sups: list[SupervisorProcess], steps: int) -> int:
    """Which supervisor's trainer prints (rank 0's), once it has printed ``steps`` steps."""
    want = f"step={steps} "
    end = time.monotonic() + TIMEOUT_S
    while time.monotonic() < end:
        for i, s in enumerate(sups):
            if any(ln.startswith(want) for ln in list(s.lines)):
                return i
            if s.proc is not None and s.proc.poll() is not None:
                raise RuntimeError(
                    "a supervisor exited before training:\n" + "\n".join(s.lines[-30:])
                )
        time.sleep(0.05)
    raise RuntimeError(f"no trainer reached step {steps}")


def _emergency(sup: SupervisorProcess) -> Event:
    ev = sup.wait_for(
        lambda e: e.get("event") in ("emergency_committed", "emergency_not_committed"),
        TIMEOUT_S,
        "the emergency commit",
    )
    if ev["event"] != "emergency_committed":
        raise RuntimeError(f"the interrupt checkpoint was not committed: {ev}")
    return ev


def _first_commit(sups: list[SupervisorProcess], name: str, after: float) -> Event:
    """The first event ``name`` (a commit) on any of ``sups`` read after ``after``."""
    end = time.monotonic() + TIMEOUT_S
    while time.monotonic() < end:
        got = [e for s in sups for e in s.find(name) if float(e["_t"]) >= after]
        if got:
            return min(got, key=lambda e: float(e["_t"]))
        for s in sups:
            if s.proc is not None and s.proc.poll() not in (None, 0):
                raise RuntimeError("a supervisor failed:\n" + "\n".join(s.lines[-30:]))
        time.sleep(0.02)
    raise RuntimeError(f"no {name} within {TIMEOUT_S:g} s")


# -- row 1: a notice on one node of two, against one node --------------------------------


def _notice_to_commit(
    srv: Server,
    bucket: str,
    root: Path,
    store_port: int,
    nodes: int,
    state_mb: int,
    rank0: bool,
    to_exit: bool,
) -> dict[str, Any]:
    """One run of ``nodes`` nodes, the notice on rank 0's node (``rank0``) or another: the
    seconds from it to the interrupt step's commit, and (``to_exit``) to the noticed
    node's ``emergency_committed``, logged once its trainer has exited."""
    run_id = f"fleet-{nodes}n-{uuid.uuid4().hex[:8]}"
    (root / run_id).mkdir(parents=True)
    fleet = Instances(
        root / run_id, srv.endpoint_url, bucket, run_id, poll_interval=POLL_INTERVAL_S
    )
    command = _torchrun(store_port, nodes, state_mb, run_id)
    try:
        booted = [_boot(fleet, f"n{i}", command, nodes) for i in range(nodes)]
        sups = [s for s, _ in booted]
        first = _training(sups, WARM_STEPS)
        noticed, emulator = booted[first if rank0 else (first + 1) % nodes]
        t0 = _notice(emulator)
        # No periodic saves: the first commit is the interrupt checkpoint's. Two nodes:
        # the merged manifest, written by whichever node completed the set.
        name = "global_checkpoint_committed" if nodes > 1 else "checkpoint_committed"
        commit = _first_commit(sups, name, t0)
        if nodes > 1 and commit.get("reason") != "interrupt":
            raise RuntimeError(f"the first commit after the notice was {commit}")
        received = _event(noticed, "notice_received", "the notice")
        out: dict[str, Any] = {
            "notice_to_commit": float(commit["_t"]) - t0,
            "detection": float(received["_t"]) - t0,
            "step": commit["step"],
        }
        if to_exit:
            emergency = _emergency(noticed)
            if emergency["committed_step"] != commit["step"]:
                raise RuntimeError(f"{emergency} is not the commit of step {commit['step']}")
            out["notice_to_emergency_committed"] = float(emergency["_t"]) - t0
        return out
    finally:
        fleet.close()


TIMES = ("notice_to_commit", "notice_to_emergency_committed", "detection")


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {
        k: round(statistics.median(float(r[k]) for r in runs), 3) for k in TIMES if k in runs[0]
    }


def _rounded(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs]


def _multinode_row(ctx: Context, srv: Server, bucket: str, state_mb: int, repeats: int) -> Row:
    import torch.distributed as dist

    # The c10d store every torchrun rendezvouses on, off the "fleet", as the README says.
    store = dist.TCPStore(  # type: ignore[attr-defined]  # not in torch.distributed's __all__
        "127.0.0.1", 0, is_master=True, wait_for_workers=False
    )
    port = int(store.port)
    root = Path(ctx.workdir) / "fleet-multinode"
    # (nodes, notice on rank 0's node); the full run also notices the other node.
    ways = [(1, True), (2, True)] + ([] if ctx.quick else [(2, False)])
    samples: dict[tuple[int, bool], list[dict[str, Any]]] = {w: [] for w in ways}
    try:
        for _ in range(repeats):  # interleaved: each repeat runs every way once
            for nodes, rank0 in ways:
                samples[(nodes, rank0)].append(
                    _notice_to_commit(
                        srv, bucket, root, port, nodes, state_mb, rank0, not ctx.quick
                    )
                )
    finally:
        del store
    label = {
        (1, True): "1_node",
        (2, True): "2_nodes_notice_on_rank0_node",
        (2, False): "2_nodes_notice_on_other_node",
    }
    med = {label[w]: _medians(runs) for w, runs in samples.items()}
    ours, base = med[label[(2, True)]], med[label[(1, True)]]
    return Row(
        "multinode",
        f"notice on 1 node of 2 -> interrupt step committed, {state_mb} MiB state",
        "s",
        ours["notice_to_commit"],
        base["notice_to_commit"],
        "the same on one node: same trainer, flags and state, same run",
        f"torchrun 2 nodes x 1 rank vs 1 x 1, {state_mb} MiB on rank 0's node",
        repeats,
        better="lower",
        server=srv.label,
        extra={
            "timed": "from the notice's publication in the emulator to the commit's event: "
            "global_checkpoint_committed on either node (2 nodes), checkpoint_committed "
            "(1 node); the notice on rank 0's node",
            "median_seconds": med,
            # Not in --quick (it stops at the commit):
            "emergency_committed_ratio": round(
                ours["notice_to_emergency_committed"] / base["notice_to_emergency_committed"], 3
            )
            if "notice_to_emergency_committed" in ours
            else None,
            "runs": {label[w]: _rounded(runs) for w, runs in samples.items()},
            "trainer": f"torchrun ... -m trainer.example --save-every {NEVER} --step-seconds "
            f"{STEP_SECONDS} --state-mb {state_mb}; the notice after step {WARM_STEPS}",
            "poll_interval_s": POLL_INTERVAL_S,
            "notice_lead_s": NOTICE_LEAD_S,
        },
    )


# -- row 2: the standby's handoff --------------------------------------------------------


def _handoff(srv: Server, bucket: str, root: Path, state_mb: int) -> dict[str, Any]:
    """Capacity rebalancing: the recommendation (an early commit), the replacement boots
    into standby and restores it, then the holder's notice and the handoff."""
    run_id = f"fleet-standby-{uuid.uuid4().hex[:8]}"
    (root / run_id).mkdir(parents=True)
    fleet = Instances(
        root / run_id, srv.endpoint_url, bucket, run_id, poll_interval=POLL_INTERVAL_S
    )
    command = [sys.executable, *_trainer_flags(state_mb)]
    try:
        holder, emulator = _boot(fleet, "holder", command)
        _training([holder], WARM_STEPS)
        emulator.set_rebalance()
        _event(holder, "checkpoint_committed", "the holder's early commit")
        standby, _ = _boot(fleet, "standby", command)
        _event(standby, "phase_changed", "standby", phase="standby")
        _event(standby, "restore_completed", "the standby's restore while waiting")
        t0 = _notice(emulator)
        emergency = _emergency(holder)
        released = _event(holder, "lease_released", "the release")
        handoff = _event(standby, "slot_handoff", "the handoff")
        # The standby starts no trainer before it takes the slot.
        started = _event(standby, "child_started", "the standby's trainer")
        if handoff.get("how") != "released" or handoff.get("handoff_seconds") is None:
            raise RuntimeError(f"not a handoff after a release: {handoff}")
        return {
            "handoff_seconds": float(handoff["handoff_seconds"]),
            "restore_seconds": float(handoff["restore_seconds"]),
            "restored_step": handoff.get("restored_step"),
            "emergency_step": emergency["committed_step"],
            # Seen from here, in the lines read from both supervisors:
            "notice_to_emergency_committed": float(emergency["_t"]) - t0,
            "emergency_committed_to_trainer_start": float(started["_t"]) - float(emergency["_t"]),
            "released_to_handoff_logged": float(handoff["_t"]) - float(released["_t"]),
        }
    finally:
        fleet.close()


def _standby_row(ctx: Context, srv: Server, bucket: str, state_mb: int, repeats: int) -> Row:
    root = Path(ctx.workdir) / "fleet-standby"
    runs = [_handoff(srv, bucket, root, state_mb) for _ in range(repeats)]
    handoff = statistics.median(r["handoff_seconds"] for r in runs)
    restore = statistics.median(r["restore_seconds"] for r in runs)
    over = [r["handoff_seconds"] - r["restore_seconds"] for r in runs]
    return Row(
        "standby",
        f"handoff: holder's release -> standby's trainer start, {state_mb} MiB state",
        "s",
        handoff,
        restore,
        "the standby's restore of that checkpoint (restore_seconds)",
        f"1 holder + 1 standby, {state_mb} MiB state",
        repeats,
        better="lower",
        target=f"<= restore + {HANDOFF_SLACK_S:g} s",
        met=all(x <= HANDOFF_SLACK_S for x in over),  # in every repeat
        server=srv.label,
        extra={
            "handoff_minus_restore_s": round(statistics.median(over), 3),
            "worst_handoff_minus_restore_s": round(max(over), 3),
            "runs": _rounded(runs),
            "trainer": f"trainer.example --save-every {NEVER} --step-seconds {STEP_SECONDS} "
            f"--state-mb {state_mb}; a rebalance recommendation's early commit, then the "
            "standby boots, then the notice",
            "poll_interval_s": POLL_INTERVAL_S,
        },
    )


def run(ctx: Context) -> list[Row]:
    """Both rows on moto behind the AWS-like shaping (one server, one bucket)."""
    state_mb = 16 if ctx.quick else 64
    repeats = ctx.repeats(3, 1)
    with server("moto", Path(ctx.workdir)) as srv:
        bucket = f"bench-fleet-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=srv.direct_url, region_name="us-east-1").create_bucket(
            Bucket=bucket
        )
        return [
            _multinode_row(ctx, srv, bucket, state_mb, repeats),
            _standby_row(ctx, srv, bucket, state_mb, repeats),
        ]
