"""An optional Prometheus textfile for node_exporter's textfile collector.

The supervisor rewrites it atomically (write, fsync, rename) whenever something it
counts changes and every few seconds while running, so node_exporter never reads half a
file. Counters only grow within one supervisor process; Prometheus' ``rate()`` and
``increase()`` handle the reset when the daemon restarts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.state import Phase, write_public_atomic

log = structlog.get_logger(__name__)

PREFIX = "spot_supervisor"


@dataclass
class Metrics:
    """What the supervisor counts; rendered by :func:`render`."""

    run_id: str
    notices: dict[str, int] = field(default_factory=dict)  # by action
    checkpoints_committed: int = 0
    bytes_uploaded: int = 0
    upload_seconds: float = 0.0
    newest_committed_step: int | None = None
    newest_committed_at: float | None = None  # wall clock
    trainer_restarts: int = 0
    metadata_failures: int = 0
    phase: str = Phase.STARTING.value


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(m: Metrics, now: float | None = None) -> str:
    """The exposition text (format 0.0.4), one HELP and TYPE per family."""
    now = time.time() if now is None else now
    run = f'run_id="{_esc(m.run_id)}"'
    out: list[str] = []

    def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        full = f"{PREFIX}_{name}"
        out.append(f"# HELP {full} {help_}")
        out.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            out.append(f"{full}{{{labels}}} {value:.17g}")

    family(
        "notices_total",
        "counter",
        "Interruption notices and stops acted on, by action.",
        [(f'{run},action="{_esc(a)}"', n) for a, n in sorted(m.notices.items())]
        or [(f'{run},action="terminate"', 0)],
    )
    family(
        "checkpoints_committed_total",
        "counter",
        "Checkpoints committed to object storage.",
        [(run, m.checkpoints_committed)],
    )
    family(
        "uploaded_bytes_total",
        "counter",
        "Bytes uploaded to object storage.",
        [(run, m.bytes_uploaded)],
    )
    family(
        "upload_seconds_total",
        "counter",
        "Seconds spent uploading checkpoints.",
        [(run, m.upload_seconds)],
    )
    if m.newest_committed_at is not None and m.newest_committed_step is not None:
        family(
            "newest_committed_step",
            "gauge",
            "Step of the newest committed checkpoint.",
            [(run, m.newest_committed_step)],
        )
        family(
            "newest_committed_timestamp_seconds",
            "gauge",
            "When the newest committed checkpoint was committed (Unix time).",
            [(run, m.newest_committed_at)],
        )
        family(
            "newest_committed_age_seconds",
            "gauge",
            "Age of the newest committed checkpoint when this file was written.",
            [(run, max(0.0, now - m.newest_committed_at))],
        )
    family(
        "trainer_restarts_total",
        "counter",
        "Restarts of a crashed training command.",
        [(run, m.trainer_restarts)],
    )
    family(
        "metadata_failures_total",
        "counter",
        "Failed polls of the metadata service.",
        [(run, m.metadata_failures)],
    )
    family(
        "phase",
        "gauge",
        "1 for the supervisor's current phase.",
        [(f'{run},phase="{p.value}"', 1 if p.value == m.phase else 0) for p in Phase],
    )
    family(
        "textfile_written_timestamp_seconds", "gauge", "When this file was written.", [(run, now)]
    )
    return "\n".join(out) + "\n"


class TextfileWriter:
    """Writes :class:`Metrics` to ``path`` atomically; a no-op when ``path`` is None.

    The file is mode 0644 (node_exporter runs as its own user). A failure to write it
    never stops the supervisor; it is logged once, and again only after a write
    succeeded in between, so a full disk does not flood the journal every few seconds.
    """

    def __init__(self, path: Path | None, metrics: Metrics) -> None:
        self.path = path
        self.metrics = metrics
        self._lock = threading.Lock()
        self._failing = False

    def write(self) -> bool:
        """Rewrite the file; False (and nothing raised) when it cannot be written."""
        if self.path is None:
            return False
        with self._lock:
            try:
                # node_exporter reads every *.prom in the dir; the staging name is no *.prom.
                write_public_atomic(self.path, render(self.metrics))
            except OSError as exc:
                if not self._failing:
                    self._failing = True
                    log.warning("metrics_textfile_unwritable", path=str(self.path), error=str(exc))
                return False
            if self._failing:
                self._failing = False
                log.info("metrics_textfile_writable_again", path=str(self.path))
        return True
