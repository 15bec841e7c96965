"""Where each party of a transfer benchmark runs: the instance's CPUs or the cloud's.

On AWS the S3 servers and the network between them and the instance are other machines:
none of their work is taken from the instance's CPUs. Here the S3 stand-in (moto or
s3rver) and the shaping proxy (the network) are processes on the same machine, and on
two cores they take more CPU than the trainer and the uploader together (moto and s3rver
spend 8-10 CPU seconds per GB; the shaper 1-2). Left to the scheduler, every way of a
benchmark then competes with the server for the same cores, and the way that does two
things at once (the emergency pipeline: the trainer writes while we upload) is charged
for the server's CPU twice over.

So, as on AWS, the benchmarks give the cloud's processes CPUs of their own and keep the
instance's (this process, the trainer it starts, boto3's threads, the AWS CLI) on the
others: :func:`split` takes the upper half of the CPUs for the cloud (at least one), the
rest for the instance. The same placement holds for every way of a row, baseline
included, and every row names it (:func:`describe`). With one CPU, or with
``SPOT_BENCH_PLACEMENT=shared``, nothing is pinned and the rows say ``shared CPUs``.

What this does not model: the server's own speed. A stand-in on one core is far slower
than S3 (about 100-130 MB/s here); rows whose both sides reach that ceiling measure the
server, and say so (``server_bound`` in their extras).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

ENV = "SPOT_BENCH_PLACEMENT"


@dataclass(frozen=True)
class Placement:
    """The CPUs of the instance's parties and of the cloud's (None: not pinned)."""

    instance: frozenset[int] | None
    cloud: frozenset[int] | None

    @property
    def pinned(self) -> bool:
        return self.instance is not None


def split() -> Placement:
    """The instance's CPUs and the cloud's, from those this process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or os.environ.get(ENV, "split") == "shared":
        return Placement(None, None)
    cloud = cpus[len(cpus) - max(1, len(cpus) // 2) :]
    return Placement(frozenset(cpus[: len(cpus) - len(cloud)]), frozenset(cloud))


def _cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def describe(p: Placement) -> str:
    """``server and proxy on CPU 1, instance on CPU 0``, or ``shared CPUs``."""
    if p.cloud is None or p.instance is None:
        return "shared CPUs"
    return f"server and proxy on CPU {_cpu_list(p.cloud)}, instance on CPU {_cpu_list(p.instance)}"


def pin(pid: int, cpus: frozenset[int] | None) -> None:
    """Every thread of process ``pid`` onto ``cpus`` (threads started later inherit it)."""
    if cpus is None:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # a thread ended
            os.sched_setaffinity(int(task.name), cpus)


def pin_self(p: Placement) -> None:
    """This process (and so every child it starts from now on) onto the instance's CPUs."""
    pin(os.getpid(), p.instance)
