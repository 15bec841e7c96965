"""``spot-supervisor demo``: the whole story on one machine, with local stand-ins.

Three boots of a real supervisor process, against moto's S3 server and the metadata
emulator on loopback, training the reference trainer on CPU (``--cloud gcp``: the GCE
metadata emulator and gcp-storage-emulator; ``--cloud azure``: Scheduled Events and
Azurite):

1. boot on an empty bucket, train, commit periodic checkpoints, get a spot notice,
   forward SIGTERM, commit the interrupt checkpoint before the notice's time, exit 0;
2. boot a "new instance" with an empty local disk: restore that checkpoint, resume,
   finish, commit the final checkpoint, write ``complete.json``;
3. boot again: ``complete.json`` is there, nothing is trained.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Event = dict[str, Any]

DEMO_BUCKET = "spot-demo"
DEMO_RUN_ID = "demo-run"
DEMO_STEPS = 60
DEMO_SAVE_EVERY = 10
# A spot notice gives two minutes; the demo's notice gives 30 s so it stays short.
DEMO_NOTICE_LEAD_S = 30.0


def write_config(
    path: Path,
    *,
    run_id: str,
    command: list[str],
    local_dir: Path,
    remote: str,
    endpoint_url: str | None,
    imds_url: str,
    runtime_dir: Path,
    poll_interval: float = 0.5,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a TOML config for a supervisor aimed at local stand-ins (``endpoint_url``
    None: no [s3] endpoint, for a gs:// or az:// remote)."""
    sections: dict[str, dict[str, Any]] = {
        "run": {"id": run_id, "command": command},
        "checkpoints": {"local_dir": str(local_dir), "remote": remote},
        "s3": {"endpoint_url": endpoint_url, "region": "us-east-1"} if endpoint_url else {},
        "imds": {"url": imds_url, "poll_interval": poll_interval},
        "daemon": {
            "runtime_dir": str(runtime_dir),
            "stop_budget": 30,
            "safety_margin": 2,
            "rescan_interval": 2,
        },
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in sections.items():
        if not values:
            continue
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _toml_value(v: Any) -> str:
    """A TOML value for strings, numbers, booleans, lists and (inline) tables."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # JSON strings and numbers are TOML


@dataclass
class SupervisorProcess:
    """A real ``spot-supervisor run`` process whose JSON events and trainer lines we read."""

    config: Path
    env: Mapping[str, str]
    echo: bool = False
    events: list[Event] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    started: float = 0.0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _eof: bool = False

    def start(self) -> SupervisorProcess:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
            env=dict(self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if self.echo:
                print(f"    | {line}", flush=True)
            with self._cond:
                self.lines.append(line)
                if line.startswith("{"):
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        ev = None
                    if isinstance(ev, dict):
                        ev["_t"] = time.monotonic()
                        self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._eof = True  # the process closed its output: nothing more will come
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[Event], bool], timeout: float, what: str) -> Event:
        """The first event matching ``pred``; AssertionError naming ``what`` on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                left = end - time.monotonic()
                if left <= 0 or self._eof:
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(f"timed out waiting for {what}; last output:\n{tail}")
                self._cond.wait(timeout=min(left, 0.2))

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                left = end - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"timed out waiting for a line {prefix!r}")
                self._cond.wait(timeout=min(left, 0.2))

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"supervisor did not exit within {timeout}s; last output:\n"
                + "\n".join(self.lines[-30:])
            ) from None
        with self._cond:  # every line it wrote is read before the caller looks at them
            self._cond.wait_for(lambda: self._eof, timeout=10)
        return code

    def find(self, name: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name]


def trainer_command(
    steps: int, save_every: int, step_seconds: float, state_mb: int = 0
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer.example",
        "--steps",
        str(steps),
        "--save-every",
        str(save_every),
        "--step-seconds",
        str(step_seconds),
        "--state-mb",
        str(state_mb),
    ]


def _at(t0: float, t: float) -> str:
    return f"{t - t0:6.1f}s"


CLOUDS = ("aws", "gcp", "azure")


@dataclass
class _Standins:
    """One cloud's stand-ins for the demo: storage, metadata emulator, and the notice."""

    cloud: str
    remote: str
    endpoint_url: str | None
    env: dict[str, str]
    storage_name: str
    emulator: Any
    stop_storage: Callable[[], None]

    def notify(self, lead_s: float) -> dt.datetime:
        """The interruption notice; returns the time the cloud will act."""
        now = dt.datetime.now(dt.timezone.utc)
        if self.cloud == "gcp":
            self.emulator.set_preempted(True)  # GCE gives no time: 30 s from now
            return now + dt.timedelta(seconds=30)
        if self.cloud == "azure":
            self.emulator.set_azure_event("Preempt", now + dt.timedelta(seconds=lead_s))
            return now + dt.timedelta(seconds=lead_s)
        when: dt.datetime = self.emulator.set_notice(
            "terminate", now + dt.timedelta(seconds=lead_s)
        )
        return when

    def clear(self) -> None:
        if self.cloud == "gcp":
            self.emulator.set_preempted(False)
        elif self.cloud == "azure":
            self.emulator.clear_azure_events()
        else:
            self.emulator.clear_notice()


def _start_standins(cloud: str) -> _Standins:
    from daemon.standins import FAKE_AWS_ENV, start_local_s3
    from daemon.standins.emulator import MetadataEmulator

    if cloud == "gcp":
        from daemon.standins.gcs import start_gcs_emulator

        gcs = start_gcs_emulator()
        gcs.create_bucket(DEMO_BUCKET)
        return _Standins(
            cloud,
            f"gs://{DEMO_BUCKET}/runs",
            None,
            gcs.env(),
            f"gcp-storage-emulator at {gcs.host}",
            MetadataEmulator(provider="gcp").start(),
            gcs.stop,
        )
    if cloud == "azure":
        from daemon.standins.azurite import start_azurite

        azurite = start_azurite()
        try:
            azurite.create_container(DEMO_BUCKET)
        except BaseException:
            azurite.stop()
            raise
        return _Standins(
            cloud,
            f"az://{DEMO_BUCKET}/runs",
            None,
            azurite.env(),
            f"Azurite at {azurite.blob_endpoint}",
            MetadataEmulator(provider="azure").start(),
            azurite.stop,
        )
    s3 = start_local_s3()
    import boto3

    boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1").create_bucket(
        Bucket=DEMO_BUCKET
    )
    return _Standins(
        cloud,
        f"s3://{DEMO_BUCKET}/runs",
        s3.endpoint_url,
        dict(FAKE_AWS_ENV),
        f"moto at {s3.endpoint_url}",
        MetadataEmulator().start(),
        s3.stop,
    )


DEMO_REPORT_DIR = Path("demo-report")
# Each boot of the story is a new instance: its own id, launched when it boots.
DEMO_INSTANCE_IDS = {
    "a": "i-0a11ce0000000000a",
    "b": "i-0b0b000000000000b",
    "c": "i-0c0c000000000000c",
}
DEMO_SPOT_PRICE = 0.42  # USD per hour for g5.xlarge, assumed for the demo's cost figures


def _write_report(config: Path, standins: _Standins, env: dict[str, str]) -> Path:
    """What the run cost, from its ledger: ``spot-supervisor report`` on the demo's run."""
    from daemon.report.cli import main as report_main

    out = DEMO_REPORT_DIR.resolve()
    # The emulator's instances are g5.xlarge; no metadata service gives a spot price, so
    # the demo states one (a typical us-east-1 figure) and prints that it did.
    argv = ["--config", str(config), "--out", str(out), "--price", f"g5.xlarge={DEMO_SPOT_PRICE}"]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the stand-ins' credentials and emulator hosts
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = report_main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if code != 0:
        raise AssertionError(f"spot-supervisor report exited {code}")
    return out


def run_demo(keep: bool = False, echo: bool = False, cloud: str = "aws") -> int:
    """Run the three boots and print the timeline; 0 when every step of the story held."""
    try:
        return _run_demo(keep, echo, cloud)
    except AssertionError as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr)
        return 1


_NOTICE_WORDS = {
    "aws": ("spot notice: terminate at", "S3"),
    "gcp": ("GCE preemption (instance/preempted = TRUE): the machine goes at", "GCS"),
    "azure": ("Azure Scheduled Event Preempt: the machine goes at", "Azure Blob"),
}


def _run_demo(keep: bool, echo: bool, cloud: str = "aws") -> int:
    from daemon.standins import StandinUnavailable

    if cloud not in CLOUDS:
        raise StandinUnavailable(f"--cloud {cloud!r} is not one of {', '.join(CLOUDS)}")
    try:
        import torch  # noqa: F401  (the reference trainer needs it)
    except ImportError:
        raise StandinUnavailable(
            "torch is not installed; install the demo extra: pip install 'spot-supervisor[demo]'"
        ) from None
    from daemon import log

    # The stand-ins log through structlog too; the demo prints only its timeline.
    log.configure(level="warning", stream=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="spot-demo-"))
    cloud_standins = _start_standins(cloud)
    emulator = cloud_standins.emulator
    env = {**os.environ, **cloud_standins.env, "PYTHONUNBUFFERED": "1"}
    notice_words, storage_words = _NOTICE_WORDS[cloud]
    t0 = time.monotonic()
    try:
        print(f"spot-supervisor demo: the whole story on this machine ({cloud})")
        print(
            f"  {storage_words}: {cloud_standins.storage_name}   metadata: emulator at"
            f" {emulator.url}"
        )
        print(
            f"  trainer: python -m trainer.example, {DEMO_STEPS} steps, checkpoint every "
            f"{DEMO_SAVE_EVERY}\n"
        )

        def config_for(instance: str) -> Path:
            return write_config(
                work / f"{instance}.toml",
                run_id=DEMO_RUN_ID,
                command=trainer_command(DEMO_STEPS, DEMO_SAVE_EVERY, 0.15),
                local_dir=work / instance / "nvme" / "checkpoints",
                remote=cloud_standins.remote,
                endpoint_url=cloud_standins.endpoint_url,
                imds_url=emulator.url,
                runtime_dir=work / instance / "run",
                extra={"imds": {"provider": cloud}},
            )

        # Boot 1: train until two checkpoints are committed, then the notice comes.
        print(
            f"{_at(t0, time.monotonic())}  boot 1 (instance A): empty bucket, training from step 0"
        )
        emulator.launch(DEMO_INSTANCE_IDS["a"])  # a new instance, launched now
        sup = SupervisorProcess(config_for("instance-a"), env, echo=echo).start()
        sup.wait_for(
            lambda e: (
                e.get("event") == "checkpoint_committed" and e.get("step", 0) >= 2 * DEMO_SAVE_EVERY
            ),
            90,
            "two periodic commits",
        )
        for ev in sup.find("checkpoint_committed"):
            print(
                f"{_at(t0, ev['_t'])}    checkpoint step {ev['step']} committed to {storage_words}"
            )
        notice_time = cloud_standins.notify(DEMO_NOTICE_LEAD_S)
        notice_at = time.monotonic()
        lead = (notice_time - dt.datetime.now(dt.timezone.utc)).total_seconds()
        print(f"{_at(t0, notice_at)}  {notice_words} {notice_time:%H:%M:%SZ} ({lead:.0f} s away)")
        sig = sup.wait_for(
            lambda e: e.get("event") == "child_signalled" and e.get("signal") == "SIGTERM",
            30,
            "SIGTERM to the trainer",
        )
        print(
            f"{_at(t0, sig['_t'])}    SIGTERM to the trainer, {sig['_t'] - notice_at:.2f} s "
            "after the notice"
        )
        code = sup.wait_exit(60)
        done = sup.find("emergency_committed")
        if code != 0 or not done:
            raise AssertionError(
                f"boot 1 exited {code} without committing the interrupt checkpoint"
            )
        interrupt_step = int(done[0]["committed_step"])
        print(
            f"{_at(t0, done[0]['_t'])}    interrupt checkpoint step {interrupt_step} committed, "
            f"{done[0]['seconds_before_deadline']:.1f} s before the notice's time"
        )
        if cloud == "azure" and emulator.azure_approvals():
            print(f"{_at(t0, time.monotonic())}    Preempt event approved after the commit")
        print(f"{_at(t0, time.monotonic())}    supervisor exited {code}; instance A is gone\n")
        cloud_standins.clear()

        # Boot 2: a new instance with an empty disk restores, resumes and finishes.
        print(f"{_at(t0, time.monotonic())}  boot 2 (instance B): empty local disk")
        emulator.launch(DEMO_INSTANCE_IDS["b"])  # a new instance, launched now
        sup2 = SupervisorProcess(config_for("instance-b"), env, echo=echo).start()
        restored = sup2.wait_for(lambda e: e.get("event") == "restore_finished", 60, "restore")
        print(
            f"{_at(t0, restored['_t'])}    restored step {restored.get('step')} from"
            f" {storage_words}, verified"
        )
        resumed = sup2.wait_for_line("resumed", 60)
        print(f"{_at(t0, time.monotonic())}    trainer: {resumed}")
        code = sup2.wait_exit(120)
        completed = sup2.find("run_completed")
        if code != 0 or not completed:
            raise AssertionError(f"boot 2 exited {code} without completing the run")
        final = next((ln for ln in sup2.lines if ln.startswith("final_params_sha256=")), "")
        print(
            f"{_at(t0, completed[0]['_t'])}    completed at step {completed[0]['step']}: "
            "final checkpoint committed, complete.json written"
        )
        print(f"             {final}")
        if restored.get("step") != interrupt_step:
            raise AssertionError(f"boot 2 restored {restored.get('step')}, not {interrupt_step}")

        # Boot 3: the run is complete; nothing trains.
        print(f"\n{_at(t0, time.monotonic())}  boot 3 (instance C)")
        emulator.launch(DEMO_INSTANCE_IDS["c"])  # a new instance, launched now
        sup3 = SupervisorProcess(config_for("instance-c"), env, echo=echo).start()
        code = sup3.wait_exit(60)
        if code != 0 or not sup3.find("run_already_complete") or sup3.find("child_started"):
            raise AssertionError(f"boot 3 exited {code} and did not stop at complete.json")
        print(f"{_at(t0, time.monotonic())}    complete.json found: not training again; exit 0")
        report = _write_report(config_for("instance-c"), cloud_standins, env)
        print(f"\ndemo finished in {time.monotonic() - t0:.1f} s")
        print(
            f"report: {report / 'report.html'} (timeline.png, report.json beside it; "
            f"spot price assumed ${DEMO_SPOT_PRICE}/h for g5.xlarge)"
        )
        return 0
    finally:
        emulator.stop()
        cloud_standins.stop_storage()
        if keep:
            print(f"demo files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
