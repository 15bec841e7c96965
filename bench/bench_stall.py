"""The training loop's stall per checkpoint: our async save against the seed's sync save.

Both sides save the same state (float32 tensors of 64 MiB, like a model's weights) of
1 GiB, and 4 GiB when disk and memory allow (``--quick``: 64 MiB), in one run,
alternating, with the page cache flushed (``os.sync``) before each measurement:

* baseline, the seed's way: ``torch.save`` of the whole state into one file, then
  fsync; the loop is blocked for all of it;
* ours: ``CheckpointManager.step_done`` at a save step with ``async_save``: the loop
  is blocked only while the state is copied into CPU memory; the files (sharded at
  1 GiB), fsyncs, manifest and renames happen in a background thread.

The snapshot buffers are allocated (and page-faulted) in the background at the run's
first boundary, as in a real run, and reused by every save; the row's value is the
median over the repeats. The time until the async checkpoint is committed (sha256 of
every byte included) is reported as well.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import Context, Row
from trainer import CheckpointManager

MiB = 1 << 20
GiB = 1 << 30
TENSOR_BYTES = 64 * MiB
TARGET = 0.1


class Weights:
    """A stand-in model: a dict of float32 tensors totalling ``size`` bytes."""

    def __init__(self, size: int, device: str = "cpu") -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        left, i = size, 0
        while left > 0:
            n = min(TENSOR_BYTES, left)
            # fill_ touches every page, as trained weights would have.
            t = torch.empty(n // 4, device=device).fill_(float(i) + 0.5)
            self.tensors[f"layer{i}.weight"] = t
            left -= n
            i += 1

    def state_dict(self) -> dict[str, Any]:
        """The tensors themselves, as Module.state_dict() returns them."""
        return self.tensors

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None:
        """Not needed here."""
        raise NotImplementedError

    def touch(self, step: int) -> None:
        """Change one value per tensor, as a training step changes the weights."""
        for t in self.tensors.values():
            t[step % t.numel()] = float(step)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _sync_save(state: dict[str, Any], path: Path) -> float:
    """The seed's way: one torch.save, fsync; the seconds the loop is blocked."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def _device() -> str:
    """``SPOT_BENCH_DEVICE=cuda`` (bench/cuda.sh) measures a GPU's state; default CPU."""
    dev = os.environ.get("SPOT_BENCH_DEVICE", "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("SPOT_BENCH_DEVICE=cuda but torch sees no CUDA device")
    return dev


def _measure(ctx: Context, size: int, repeats: int) -> Row:
    work = Path(ctx.workdir) / f"stall-{size // MiB}"
    work.mkdir(parents=True, exist_ok=True)
    device = _device()
    weights = Weights(size, device)
    ckpt = CheckpointManager(
        work / "async", run_id="bench", keep=1, save_every=1, handle_signals=False
    )
    ckpt.track(model=weights)
    sync_s: list[float] = []
    async_s: list[float] = []
    commit_s: list[float] = []
    files = 0
    try:
        # The boundary a run starts from: no save, but the snapshot buffers get made in
        # the background, as they would during a real run's first steps.
        ckpt.step_done(0)
        ckpt.wait()
        for step in range(1, repeats + 1):
            weights.touch(step)
            os.sync()
            sync_s.append(_sync_save(weights.state_dict(), work / "seed.pt"))
            (work / "seed.pt").unlink()
            os.sync()
            t0 = time.perf_counter()
            ckpt.step_done(step)
            async_s.append(time.perf_counter() - t0)
            manifest = ckpt.wait()  # stands in for the training steps until the next save
            commit_s.append(time.perf_counter() - t0)
            files = len(manifest.files) if manifest else 0
    finally:
        ckpt.close()
        shutil.rmtree(work, ignore_errors=True)
    ours, base = statistics.median(async_s), statistics.median(sync_s)
    return Row(
        group="stall",
        name=f"loop stall per checkpoint, {size / GiB:g} GiB state"
        + ("" if device == "cpu" else f" on {device}"),
        unit="s",
        ours=ours,
        baseline=base,
        baseline_name="torch.save + fsync in the loop",
        size=f"{size // MiB} MiB",
        repeats=repeats,
        target=f"<= {TARGET}",
        met=ours <= TARGET * base,
        extra={
            "async_stall_s": async_s,
            "sync_stall_s": sync_s,
            "first_async_stall_s": async_s[0],
            "async_time_to_commit_s": commit_s,
            "files_per_checkpoint": files,
            "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        },
    )


def run(ctx: Context) -> list[Row]:
    """Stall at 1 GiB (and 4 GiB when it fits); ``--quick``: 64 MiB."""
    if ctx.quick:
        return [_measure(ctx, 64 * MiB, 2)]
    if os.environ.get("SPOT_BENCH_STALL_GIB"):
        # bench/cuda.sh: explicit sizes (e.g. 8 GiB of GPU state), no fitting heuristics.
        sizes = [int(float(x) * GiB) for x in os.environ["SPOT_BENCH_STALL_GIB"].split(",")]
        return [_measure(ctx, size, 2) for size in sizes]
    rows = [_measure(ctx, GiB, 3)]
    big = 4 * GiB
    free_disk = shutil.disk_usage(ctx.workdir).free
    # Disk: the seed's file and one async checkpoint at a time, plus room to spare.
    # Memory: the state, the snapshot buffers and a page cache to write through.
    if free_disk < 3 * big:
        print(f"   skipping 4 GiB: {free_disk / GiB:.1f} GiB free disk in {ctx.workdir}")
    elif _mem_available() < 3 * big:
        print(f"   skipping 4 GiB: {_mem_available() / GiB:.1f} GiB memory available")
    else:
        rows.append(_measure(ctx, big, 2))
    return rows
