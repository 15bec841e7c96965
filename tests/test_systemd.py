"""The unit under a real systemd (PID 1 of a new namespace, tests/systemd_sandbox.py).

Each test boots its own systemd, installs the shipped unit with only its paths pointed
at this checkout (venv, config, checkpoint dir), and drives it with ``systemctl`` the way
an operator would, against the metadata emulator and moto on loopback. The trainer is
the torch-free tests/scripted_trainer.py. Also here: the journal's native protocol, on
a real datagram socket (no systemd needed).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from systemd_sandbox import Sandbox, kept_paths, unavailable_reason

from daemon import journal
from daemon.standins import FAKE_AWS_ENV, LocalS3
from daemon.standins.demo import write_config
from daemon.standins.emulator import MetadataEmulator

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).with_name("scripted_trainer.py"))
UNIT = "spot-supervisor.service"
SHIPPED_UNIT = REPO / "systemd" / UNIT
RUN_ID = "systemd-run"
# Outside every tmpfs the sandbox mounts (/run /tmp /var/tmp /var/log /var/lib/systemd):
# the unit inside must see the same files as the test.
WORK_ROOT = REPO / ".pytest_cache" / "systemd-tests"


def unit_for_test(work: Path) -> str:
    """The shipped unit with only its paths pointed at this checkout and ``work``.

    Every other directive stays as shipped; a path that no longer occurs in the shipped
    unit fails here rather than silently testing something else.
    """
    text = SHIPPED_UNIT.read_text()
    paths = {
        "/opt/spot-supervisor/venv": sys.prefix,
        "/etc/spot-supervisor/config.toml": str(work / "config.toml"),
        "/etc/spot-supervisor/environment": str(work / "environment"),
        "/opt/dlami/nvme": str(work / "nvme"),
    }
    for shipped, here in paths.items():
        assert shipped in text, f"{shipped} is no longer in {SHIPPED_UNIT}"
        text = text.replace(shipped, here)
    for kept in kept_paths():
        if any(Path(d) == kept or Path(d) in kept.parents for d in ("/tmp", "/var/tmp")):
            # A checkout under /tmp (a CI clone): PrivateTmp= would hide it, and with it
            # the venv the unit runs. Test-only, never in the shipped unit.
            text += f"\n[Service]\nBindReadOnlyPaths={kept}\n"
    return text


# --- the native protocol, without systemd ------------------------------------------------


def _decode(datagram: bytes) -> dict[str, str]:
    """Parse journald's native protocol (the inverse of journal.encode)."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", datagram[nl + 1 : nl + 9])
            fields[line.decode()] = datagram[nl + 9 : nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return fields


def test_journal_native_protocol_round_trip() -> None:
    path = WORK_ROOT / f"sock-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    try:
        sender = journal.JournalSender(str(path))
        event = {
            "event": "notice_received",
            "level": "warning",
            "action": "terminate",
            "deadline-s": 118.5,
            "trace": "line one\nline two",
            "files": ["a", "b"],
        }
        assert sender.send(journal.event_fields(event))
        got = _decode(server.recv(65536))
        assert got["SPOT_EVENT"] == "notice_received"
        assert got["PRIORITY"] == "4"
        assert got["SYSLOG_IDENTIFIER"] == "spot-supervisor"
        assert got["SPOT_ACTION"] == "terminate"
        assert got["SPOT_DEADLINE_S"] == "118.5"
        assert got["SPOT_TRACE"] == "line one\nline two"  # binary-safe form
        assert json.loads(got["SPOT_FILES"]) == ["a", "b"]
        assert got["MESSAGE"].startswith("notice_received action=terminate")
        sender.close()
    finally:
        server.close()
        path.unlink()


def test_journal_stream_must_match_stdout() -> None:
    st = os.fstat(0)
    assert journal.stream_is_journal(0, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not journal.stream_is_journal(0, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not journal.stream_is_journal(0, {})
    assert journal.JournalSender.connect(str(WORK_ROOT / "no-such-socket")) is None


# --- real systemd -------------------------------------------------------------------------


@dataclass
class Booted:
    sandbox: Sandbox
    work: Path
    emulator: MetadataEmulator
    s3_client: Any
    bucket: str

    def start(self, *trainer_args: str, stop_budget: float = 20) -> None:
        """Configure the run and install the unit; ``systemctl start`` is the test's."""
        write_config(
            self.work / "config.toml",
            run_id=RUN_ID,
            command=[sys.executable, SCRIPT, *trainer_args],
            local_dir=self.work / "nvme" / "checkpoints",
            remote=f"s3://{self.bucket}/runs",
            endpoint_url=self.s3_client.meta.endpoint_url,
            imds_url=self.emulator.url,
            runtime_dir=Path("/run/spot-supervisor"),
            poll_interval=0.2,
            extra={"daemon": {"stop_budget": stop_budget}},
        )
        # The optional EnvironmentFile=: here the stand-ins' fake credentials, and the
        # checkout on the trainer's path (it imports daemon.layout).
        env = {**FAKE_AWS_ENV, "PYTHONPATH": str(REPO)}
        (self.work / "environment").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        self.sandbox.install_unit(UNIT, unit_for_test(self.work))

    def systemctl(self, *args: str) -> str:
        """``systemctl ARGS`` in the sandbox; on failure the error carries the unit's journal."""
        r = self.sandbox.systemctl(*args, check=False)
        if r.returncode != 0:
            raise AssertionError(
                f"systemctl {' '.join(args)} exited {r.returncode}: {r.stderr}\n{self.tail()}"
            )
        return r.stdout

    def journal(self, *match: str) -> list[dict[str, Any]]:
        out = self.sandbox.journalctl("-u", UNIT, "-o", "json", *match)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.journal(f"SPOT_EVENT={name}")

    def wait_event(
        self, name: str, timeout: float, pred: Callable[[dict[str, Any]], bool] = lambda e: True
    ) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events(name):
                if pred(e):
                    return e
            time.sleep(0.3)
        raise AssertionError(f"no {name} event within {timeout}s; journal:\n{self.tail()}")

    def wait_state(self, timeout: float, **want: str) -> dict[str, str]:
        end = time.monotonic() + timeout
        while True:
            props = self.show()
            if all(props.get(k) == v for k, v in want.items()):
                return props
            if time.monotonic() > end:
                raise AssertionError(f"unit never reached {want}: {props}\n{self.tail()}")
            time.sleep(0.2)

    def show(self) -> dict[str, str]:
        return self.sandbox.show(
            UNIT,
            "ActiveState",
            "SubState",
            "Result",
            "MainPID",
            "NRestarts",
            "ExecMainCode",
            "ExecMainStatus",
            "ActiveEnterTimestampMonotonic",
            "TimeoutStopUSec",
            "StatusText",
        )

    def tail(self) -> str:
        return self.sandbox.journalctl("-u", UNIT, "-n", "60")

    def committed(self) -> dict[int, str]:
        """Remote step -> the manifest's reason, for every committed checkpoint."""
        prefix = f"runs/{RUN_ID}/checkpoints/"
        resp = self.s3_client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        out: dict[int, str] = {}
        for o in resp.get("Contents", []):
            if o["Key"].endswith("/manifest.json"):
                body = self.s3_client.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
                doc = json.loads(body)
                out[int(doc["step"])] = doc["reason"]
        return out


@pytest.fixture
def booted(s3_server: LocalS3, s3_client: Any, bucket: str) -> Iterator[Booted]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"a real systemd cannot boot here: {reason}")
    work = WORK_ROOT / uuid.uuid4().hex[:12]
    (work / "nvme").mkdir(parents=True)
    sandbox = Sandbox(work / "sandbox")
    try:
        with MetadataEmulator() as emulator:
            sandbox.boot()
            yield Booted(sandbox, work, emulator, s3_client, bucket)
    finally:
        sandbox.teardown()
        shutil.rmtree(work, ignore_errors=True)


def _int(entry: dict[str, Any], key: str) -> int:
    return int(entry[key])


@pytest.mark.systemd
def test_start_returns_after_restore_and_child_start_and_logs_fields(booted: Booted) -> None:
    booted.start("100000", "--step-seconds", "0.2")
    booted.systemctl("start", UNIT)  # blocks until READY=1 (Type=notify)
    props = booted.show()
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    ready_at = int(props["ActiveEnterTimestampMonotonic"])
    # By the time systemd saw READY=1, the restore had finished and the child was started.
    restored = booted.events("restore_finished")
    started = booted.events("child_started")
    assert len(restored) == 1 and len(started) == 1, booted.tail()
    assert int(restored[0]["__MONOTONIC_TIMESTAMP"]) <= ready_at
    assert int(started[0]["__MONOTONIC_TIMESTAMP"]) <= ready_at
    # Our STATUS= text in `systemctl status`.
    status = booted.sandbox.systemctl("status", UNIT, check=False).stdout
    assert re.search(r'Status: "training: child pid \d+"', status), status
    # Events as fields, found by field match; values typed as the event had them.
    child = started[0]
    assert child["SYSLOG_IDENTIFIER"] == "spot-supervisor"
    assert child["PRIORITY"] == "6"
    assert child["_SYSTEMD_UNIT"] == UNIT
    assert json.loads(child["SPOT_ARGV"])[1] == SCRIPT
    assert int(child["SPOT_PID"]) > 0
    phases = [e["SPOT_PHASE"] for e in booted.events("phase_changed")]
    assert phases[:2] == ["restoring", "training"], phases
    # The trainer's own stdout lands in the same unit's journal, as plain lines.
    booted.wait_event("checkpoint_committed", 30)
    messages = [e.get("MESSAGE") for e in booted.journal()]
    assert "resumed step=0" in messages
    booted.systemctl("stop", UNIT)


@pytest.mark.systemd
def test_notice_commits_interrupt_checkpoint_and_unit_ends_inactive_success(
    booted: Booted,
) -> None:
    booted.start("100000", "--step-seconds", "0.2")
    booted.systemctl("start", UNIT)
    booted.wait_event("checkpoint_committed", 30)
    booted.emulator.set_notice(
        "terminate", dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=10)
    )
    props = booted.wait_state(30, ActiveState="inactive")
    assert props["Result"] == "success" and props["ExecMainStatus"] == "0", props
    assert props["NRestarts"] == "0"
    done = booted.events("emergency_committed")
    assert len(done) == 1, booted.tail()
    step = _int(done[0], "SPOT_COMMITTED_STEP")
    assert done[0]["SPOT_ACTION"] == "terminate"
    assert float(done[0]["SPOT_SECONDS_BEFORE_DEADLINE"]) > 0
    assert booted.committed()[step] == "interrupt"
    assert booted.events("child_signalled")[0]["SPOT_SIGNAL"] == "SIGTERM"


@pytest.mark.systemd
def test_systemctl_stop_is_orderly_within_timeout_stop_sec(booted: Booted) -> None:
    booted.start("100000", "--step-seconds", "0.2")
    booted.systemctl("start", UNIT)
    booted.wait_event("checkpoint_committed", 30)
    timeout_stop = int(re.search(r"^TimeoutStopSec=(\d+)s$", SHIPPED_UNIT.read_text(), re.M)[1])
    t0 = time.monotonic()
    booted.systemctl("stop", UNIT)  # SIGTERM to the main process (KillMode=mixed)
    took = time.monotonic() - t0
    props = booted.show()
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success", props  # not "timeout", not "signal"
    assert booted.events("phase_changed")[-1]["SPOT_PHASE"] == "done"
    assert took < timeout_stop, f"stop took {took:.1f}s, TimeoutStopSec is {timeout_stop}s"
    # The supervisor forwarded SIGTERM; the trainer saved and exited by itself.
    signalled = booted.events("child_signalled")
    assert [e["SPOT_SIGNAL"] for e in signalled] == ["SIGTERM"]
    exited = booted.events("child_exited")
    assert len(exited) == 1 and exited[0]["SPOT_RETURNCODE"] == "0", exited
    assert not booted.events("child_tree_killed")
    saved = [e["MESSAGE"] for e in booted.journal() if "reason=interrupt" in str(e.get("MESSAGE"))]
    assert len(saved) == 1, saved
    step = int(saved[0].split()[1].split("=")[1])
    done = booted.events("emergency_committed")
    assert len(done) == 1 and _int(done[0], "SPOT_COMMITTED_STEP") == step
    assert booted.committed()[step] == "interrupt"
    # systemd never had to SIGKILL anything left in the cgroup: nobody died mid-save.
    assert not [e for e in booted.journal() if "SIGKILL" in str(e.get("MESSAGE"))]


@pytest.mark.systemd
def test_kill_9_of_supervisor_restarts_and_resumes_from_newest_checkpoint(
    booted: Booted,
) -> None:
    booted.start("100000", "--step-seconds", "0.2")
    booted.systemctl("start", UNIT)
    booted.wait_event("checkpoint_committed", 30, lambda e: _int(e, "SPOT_STEP") >= 3)
    first = booted.show()
    old_trainer = _int(booted.events("child_started")[0], "SPOT_PID")
    booted.sandbox.sh(f"kill -9 {first['MainPID']}")
    before = booted.committed()
    # Restart=on-failure, after RestartSec=5s; READY=1 again once restored and started.
    props = booted.wait_state(30, NRestarts="1", ActiveState="active", SubState="running")
    assert props["MainPID"] != first["MainPID"]
    # KillMode=mixed: the orphaned trainer went with the killed supervisor's cgroup.
    assert booted.sandbox.sh(f"kill -0 {old_trainer}", check=False).returncode != 0
    restores = booted.events("restore_finished")
    assert len(restores) == 2, booted.tail()

    def resumed_steps() -> list[int]:
        return [
            int(e["MESSAGE"].split("=")[1])
            for e in booted.journal()
            if str(e.get("MESSAGE")).startswith("resumed step=")
        ]

    # The new trainer's first line reaches the journal a moment after READY=1.
    end = time.monotonic() + 20
    while len(resumed := resumed_steps()) < 2 and time.monotonic() < end:
        time.sleep(0.2)
    assert len(resumed) == 2 and resumed[0] == 0
    # It resumed from the newest checkpoint, at or past every committed one.
    assert resumed[1] >= max(before), (resumed, before)
    restored_step = restores[1].get("SPOT_STEP")
    assert restored_step is not None and int(restored_step) >= max(before)
    booted.wait_event("checkpoint_committed", 30, lambda e: _int(e, "SPOT_STEP") > resumed[1])
    booted.systemctl("stop", UNIT)
    after = booted.committed()
    assert max(after) > max(before)
