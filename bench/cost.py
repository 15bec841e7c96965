"""Cost model: what k interruptions cost a 20-hour run, for us and for the seed's way.

Prices are the seed article's p4d.24xlarge figures ($32.77/h on demand, $9.83/h spot).
The measured inputs come from the same ``make bench`` run when present (detection
latency; upload and restore speed relative to boto3's defaults); the rest are stated
assumptions, printed with the table so every number can be checked.

Per interruption, the run pays:

* lost work: steps trained since the newest checkpoint that reached S3;
* recovery: a new instance boots, restores the checkpoint, and warms up again.

The seed's way (its 5 s poller and SIGTERM handler, checkpoints to local disk, and the
usual cron ``aws s3 sync`` to keep them) saves an emergency checkpoint locally, but
nothing carries it into S3 before the machine goes: the newest checkpoint in S3 is the
last one the cron copied. Ours commits the emergency checkpoint before the deadline, so
only the work since the last step boundary is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ON_DEMAND_PER_HOUR = 32.77
SPOT_PER_HOUR = 9.83
RUN_HOURS = 20.0
NOTICE_SECONDS = 120.0
SAFETY_MARGIN_S = 5.0


@dataclass(frozen=True)
class Assumptions:
    """Inputs of the model; the defaults are stated in the README's table."""

    checkpoint_gb: float = 30.0  # a 7B model's bf16 weights plus its optimizer shards
    periodic_minutes: float = 30.0  # how often both save a periodic checkpoint
    cron_sync_minutes: float = 15.0  # the seed's cron `aws s3 sync` interval
    s3_upload_gbps: float = 1.2  # GB/s a p4d reaches to S3 with a default client
    s3_download_gbps: float = 1.5  # GB/s restore with a default client
    boot_minutes: float = 6.0  # a new spot instance: capacity, boot, AMI, data, warm-up
    step_seconds: float = 1.0  # one training step
    ours_detect_s: float = 0.5
    ours_upload_speedup: float = 1.0  # ours / default client, from bench_transfer
    ours_restore_speedup: float = 1.0


@dataclass(frozen=True)
class Outcome:
    """What k interruptions cost one way of running."""

    name: str
    interruptions: int
    lost_minutes: float
    overhead_minutes: float
    wall_hours: float
    cost: float
    savings_vs_on_demand: float


def lost_per_interruption_min(a: Assumptions, ours: bool) -> float:
    """Expected training minutes lost at one interruption."""
    if ours:
        upload_s = a.checkpoint_gb / (a.s3_upload_gbps * a.ours_upload_speedup)
        if a.ours_detect_s + a.step_seconds + upload_s <= NOTICE_SECONDS - SAFETY_MARGIN_S:
            # The emergency checkpoint is committed: lost is at most the step in progress.
            return (a.ours_detect_s + a.step_seconds) / 60
        # Too big to upload in the notice: the newest periodic one, committed as soon
        # as it was written (no cron lag), stands.
        return a.periodic_minutes / 2
    # Newest checkpoint in S3: the last periodic one the cron copied. On average half a
    # periodic interval since it was written, plus (on average) half a cron interval
    # before the cron copied the one after it.
    return a.periodic_minutes / 2 + a.cron_sync_minutes / 2


def recovery_min(a: Assumptions, ours: bool) -> float:
    """Minutes from losing the machine to training again on the next one."""
    speed = a.s3_download_gbps * (a.ours_restore_speedup if ours else 1.0)
    return a.boot_minutes + a.checkpoint_gb / speed / 60


def outcome(a: Assumptions, k: int, ours: bool) -> Outcome:
    lost = k * lost_per_interruption_min(a, ours)
    overhead = k * recovery_min(a, ours)
    wall = RUN_HOURS + (lost + overhead) / 60
    cost = wall * SPOT_PER_HOUR
    return Outcome(
        name="spot-supervisor" if ours else "seed (poller + cron s3 sync)",
        interruptions=k,
        lost_minutes=lost,
        overhead_minutes=overhead,
        wall_hours=wall,
        cost=cost,
        savings_vs_on_demand=1 - cost / (RUN_HOURS * ON_DEMAND_PER_HOUR),
    )


def assumptions_from(rows: list[dict[str, Any]]) -> tuple[Assumptions, list[str]]:
    """Take measured inputs from this run's benchmark rows; say which were used."""
    a = Assumptions()
    used: list[str] = []
    by_name = {(r["group"], r["name"]): r for r in rows}
    det = next(
        (
            r
            for (g, n), r in by_name.items()
            if g == "detection" and n.startswith("notice -> SIGTERM p50, ours at")
        ),
        None,
    )
    seed = next(
        (
            r
            for (g, n), r in by_name.items()
            if g == "detection" and n.startswith("notice -> SIGTERM p50, both")
        ),
        None,
    )
    if det:
        a = Assumptions(**{**a.__dict__, "ours_detect_s": det["ours"]})
        seed_s = f", seed {seed['baseline']:.2f} s at its 5 s" if seed else ""
        used.append(f"detection p50: ours {det['ours']:.2f} s at 1 s polling{seed_s}")
    for key, field_name in (("upload", "ours_upload_speedup"), ("restore", "ours_restore_speedup")):
        cand = [
            r
            for r in rows
            if r["group"] == "transfer"
            and key in r["name"]
            and r.get("better") == "higher"
            and r.get("ratio")
            and str(r.get("baseline_name", "")).startswith("boto3")
        ]
        if cand:
            ratio = min(r["ratio"] for r in cand)  # the least favourable measured shape
            a = Assumptions(**{**a.__dict__, field_name: ratio})
            used.append(f"{key} speed vs boto3 default: x{ratio:.2f} (least favourable shape)")
    return a, used


def cost_markdown(rows: list[dict[str, Any]], ks: tuple[int, ...] = (0, 2, 5, 10)) -> str:
    """The README's cost table, from this run's rows."""
    a, used = assumptions_from(rows)
    on_demand = RUN_HOURS * ON_DEMAND_PER_HOUR
    out = [
        f"A {RUN_HOURS:g}-hour p4d.24xlarge run (${ON_DEMAND_PER_HOUR}/h on demand = "
        f"${on_demand:,.2f}; ${SPOT_PER_HOUR}/h spot) with k interruptions:",
        "",
        "| k | way | lost training | lost steps | recovery | wall clock | cost "
        "| saved vs on-demand |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        for ours in (False, True):
            o = outcome(a, k, ours)
            out.append(
                f"| {k} | {o.name} | {o.lost_minutes:.1f} min | "
                f"{o.lost_minutes * 60 / a.step_seconds:,.0f} | {o.overhead_minutes:.1f} min | "
                f"{o.wall_hours:.2f} h | ${o.cost:,.2f} | {o.savings_vs_on_demand:.0%} |"
            )
    out += [
        "",
        f"Assumptions: checkpoint {a.checkpoint_gb:g} GB; periodic checkpoint every "
        f"{a.periodic_minutes:g} min; the seed's cron sync every {a.cron_sync_minutes:g} min; "
        f"S3 at {a.s3_upload_gbps:g} GB/s up, {a.s3_download_gbps:g} GB/s down with a default "
        f"client; {a.boot_minutes:g} min to get and boot the next instance; "
        f"{a.step_seconds:g} s per step.",
        "Measured in this run: " + ("; ".join(used) if used else "nothing (defaults used)") + ".",
    ]
    return "\n".join(out) + "\n"
