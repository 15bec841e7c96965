"""The checkpoint layout (CONTRACT §4): the atomic writer under real crashes, and manifests.

The crash tests run a real child process that dies (SIGKILL, or os._exit) between
writing two files of a checkpoint; nothing is simulated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.layout import (
    MANIFEST_NAME,
    CheckpointWriter,
    FileEntry,
    ManifestError,
    list_step_dirs,
    load_complete,
    parse_manifest,
    parse_step_dir,
    parse_tmp_dir,
    start_writeback,
    step_dir_name,
    write_file,
)
from trainer.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parent.parent

# Writes one file of checkpoint 7, says so, then dies the way argv[2] says.
_CRASHER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from daemon.layout import CheckpointWriter
    w = CheckpointWriter(Path(sys.argv[1]), "run", 7, "periodic").__enter__()
    w.add_bytes("first.bin", b"x" * 4096)
    print("written", flush=True)
    if sys.argv[2] == "exit":
        os._exit(3)
    time.sleep(120)
    """
)


def _start_crasher(local_dir: Path, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(local_dir), mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "written"
    return proc


def _tmp_dirs(local_dir: Path) -> list[Path]:
    return sorted(p for p in local_dir.iterdir() if p.name.startswith(".tmp-"))


@pytest.fixture
def local_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    return d


@pytest.mark.parametrize("mode", ["sigkill", "exit"])
def test_crash_between_files_leaves_only_a_tmp_dir_which_the_next_manager_removes(
    local_dir: Path, mode: str
) -> None:
    proc = _start_crasher(local_dir, mode)
    if mode == "sigkill":
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == (-signal.SIGKILL if mode == "sigkill" else 3)

    assert list_step_dirs(local_dir) == []
    [tmp] = _tmp_dirs(local_dir)
    assert parse_tmp_dir(tmp.name) == 7
    assert f"-{proc.pid}-" in tmp.name
    # The finished file is under its final name; there is no manifest.
    assert sorted(p.name for p in tmp.iterdir()) == ["first.bin"]

    CheckpointManager(local_dir, handle_signals=False).close()
    assert _tmp_dirs(local_dir) == []
    assert list_step_dirs(local_dir) == []


def test_tmp_dir_of_a_live_writer_is_left_alone(local_dir: Path) -> None:
    proc = _start_crasher(local_dir, "sleep")
    try:
        [tmp] = _tmp_dirs(local_dir)
        CheckpointManager(local_dir, handle_signals=False).close()
        assert tmp.is_dir()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    CheckpointManager(local_dir, handle_signals=False).close()
    assert not tmp.exists()


def test_writer_commits_files_and_manifest_last(local_dir: Path) -> None:
    with CheckpointWriter(local_dir, "run-1", 12, "requested") as w:
        w.add_bytes("a.bin", b"hello")
        with w.open_file("sub/b.bin") as f:
            f.write(memoryview(b"world!"))
        manifest = w.commit()
    final = local_dir / "step-000000012"
    assert final.is_dir() and _tmp_dirs(local_dir) == []
    assert [(f.path, f.size) for f in manifest.files] == [("a.bin", 5), ("sub/b.bin", 6)]
    loaded = load_complete(final)
    assert loaded.step == 12 and loaded.reason == "requested" and loaded.run_id == "run-1"
    assert loaded.files == manifest.files
    assert not any(p.name.endswith(".partial") for p in final.rglob("*"))


def test_writer_leaving_without_commit_removes_its_tmp_dir(local_dir: Path) -> None:
    with pytest.raises(RuntimeError), CheckpointWriter(local_dir, "r", 3, "periodic") as w:
        w.add_bytes("a.bin", b"x")
        raise RuntimeError("boom")
    assert list(local_dir.iterdir()) == []


def test_writer_never_replaces_a_complete_checkpoint(local_dir: Path) -> None:
    with CheckpointWriter(local_dir, "r", 3, "periodic") as w:
        w.add_bytes("a.bin", b"first")
        w.commit()
    with pytest.raises(FileExistsError), CheckpointWriter(local_dir, "r", 3, "final") as w:
        w.add_bytes("a.bin", b"second")
        w.commit()
    assert (local_dir / "step-000000003" / "a.bin").read_bytes() == b"first"
    assert _tmp_dirs(local_dir) == []


def test_names() -> None:
    assert step_dir_name(1200) == "step-000001200"
    assert parse_step_dir("step-000001200") == 1200
    assert parse_step_dir("step-1200") is None
    assert parse_tmp_dir(".tmp-step-000000005-123-ab") == 5
    assert parse_tmp_dir(".tmp-step-000000005") is None
    with pytest.raises(ValueError):
        step_dir_name(10**9)


# -- manifest validation: each error names what is wrong ------------------------------


@pytest.fixture
def ckpt(local_dir: Path) -> Iterator[Path]:
    with CheckpointWriter(local_dir, "run", 5, "periodic") as w:
        w.add_bytes("model.pt", b"m" * 100)
        w.add_bytes("rng.pt", b"r" * 10)
        w.commit()
    yield local_dir / "step-000000005"


def _edit_manifest(ckpt: Path, **changes: object) -> None:
    doc = json.loads((ckpt / MANIFEST_NAME).read_bytes())
    doc.update(changes)
    (ckpt / MANIFEST_NAME).write_text(json.dumps(doc))


def test_bad_sha_names_the_file(ckpt: Path) -> None:
    (ckpt / "model.pt").write_bytes(b"M" * 100)  # same size, other bytes
    with pytest.raises(ManifestError, match=r"model\.pt does not match its sha256"):
        load_complete(ckpt)
    load_complete(ckpt, hash_files=False)  # the size check alone cannot see it


def test_missing_file_names_the_file(ckpt: Path) -> None:
    (ckpt / "rng.pt").unlink()
    with pytest.raises(ManifestError, match=r"rng\.pt is listed in the manifest but missing"):
        load_complete(ckpt)


def test_truncated_file_names_the_file_and_sizes(ckpt: Path) -> None:
    with open(ckpt / "model.pt", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ManifestError, match=r"model\.pt has 40 bytes, the manifest says 100"):
        load_complete(ckpt)


def test_wrong_step_names_both_steps(ckpt: Path) -> None:
    moved = ckpt.with_name("step-000000006")
    ckpt.rename(moved)
    with pytest.raises(ManifestError, match=r"step 5 does not match its directory \(step 6\)"):
        load_complete(moved)


def test_missing_manifest(ckpt: Path) -> None:
    (ckpt / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match=r"has no manifest\.json"):
        load_complete(ckpt)


@pytest.mark.parametrize("bad", ["../outside", "/etc/passwd", "a/../../b", "./x", "a\\b", ""])
def test_path_traversal_is_refused(ckpt: Path, bad: str) -> None:
    files = [{"path": bad, "size": 1, "sha256": "0" * 64}]
    _edit_manifest(ckpt, files=files)
    with pytest.raises(ManifestError, match="file path"):
        load_complete(ckpt)


def _doc(**changes: object) -> bytes:
    doc: dict[str, object] = {
        "format": "spot-checkpoint/1",
        "run_id": "r",
        "step": 3,
        "created_at": "2026-11-28T09:00:00Z",
        "reason": "periodic",
        "files": [{"path": "model.pt", "size": 1, "sha256": "a" * 64}],
    }
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (_doc(format="other/2"), "format is 'other/2'"),
        (_doc(step=-1), "step -1 is not an integer"),
        (_doc(step=True), "step True is not an integer"),
        (_doc(reason="because"), "reason 'because' is not one of"),
        (_doc(run_id=""), "run_id is missing"),
        (_doc(files={}), "files is missing or not a list"),
        (_doc(files=[{"path": "a", "size": -1, "sha256": "a" * 64}]), r"\(a\) size -1"),
        (_doc(files=[{"path": "a", "size": 1, "sha256": "A" * 64}]), r"\(a\) sha256 is not 64"),
        (_doc(files=[{"path": "manifest.json", "size": 1, "sha256": "a" * 64}]), "reserved"),
        (_doc(files=[{"path": "m.pt.partial", "size": 1, "sha256": "a" * 64}]), "reserved"),
        (
            _doc(files=[{"path": "a", "size": 1, "sha256": "a" * 64}] * 2),
            "lists a twice",
        ),
    ],
)
def test_parse_manifest_errors_name_the_problem(raw: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(raw)


def test_parse_manifest_keeps_extra_keys() -> None:
    m = parse_manifest(_doc(trainer="x"), expect_step=3)
    assert m.extra == {"trainer": "x"} and m.total_bytes == 1
    assert json.loads(m.to_json())["trainer"] == "x"


def test_no_partial_name_survives_a_finished_file(local_dir: Path) -> None:
    # A file under its final name is finished (the supervisor may upload it at once).
    w = CheckpointWriter(local_dir, "r", 9, "periodic").__enter__()
    try:
        with w.open_file("a.bin") as f:
            f.write(b"abc")
            assert (w.tmp_dir / "a.bin.partial").exists()
            assert not (w.tmp_dir / "a.bin").exists()
        assert (w.tmp_dir / "a.bin").exists()
        assert not (w.tmp_dir / "a.bin.partial").exists()
    finally:
        w.__exit__(None, None, None)
    assert not os.path.exists(w.tmp_dir)


def test_files_written_by_another_process_are_listed_and_checked(local_dir: Path) -> None:
    # A distributed save: other ranks write into the writer's .tmp- directory through
    # write_file and report (path, size, sha256); the writer lists them and commits.
    with CheckpointWriter(local_dir, "r", 4, "periodic") as w:
        w.add_bytes("model.pt", b"weights")
        with write_file(w.tmp_dir, "rng-rank00001.pt") as f:
            f.write(b"rank one")
        other = FileEntry("rng-rank00001.pt", f.size, f.sha256)
        assert not (w.tmp_dir / "rng-rank00001.pt.partial").exists()
        with pytest.raises(ManifestError, match="reported written but is missing"):
            w.add_files([FileEntry("absent.pt", 1, "0" * 64)])
        with pytest.raises(ManifestError, match="its writer reported 99"):
            w.add_files([FileEntry("rng-rank00001.pt", 99, other.sha256)])
        with pytest.raises(ManifestError, match="written twice"):
            w.add_files([FileEntry("model.pt", 7, "0" * 64)])
        w.add_files([other])
        manifest = w.commit()
    assert [f.path for f in manifest.files] == ["model.pt", "rng-rank00001.pt"]
    assert load_complete(local_dir / "step-000000004").files == manifest.files


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_hands_the_range_to_the_kernel(tmp_path: Path) -> None:
    # The restore starts each range's writeback as it lands; a wrong binding of
    # sync_file_range would fail here (EINVAL, EBADF) instead of silently doing nothing.
    path = tmp_path / "f.partial"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_WRONLY)
    try:
        assert start_writeback(fd, 0, 1 << 20)
        assert start_writeback(fd, 512 * 1024, 4096)
        assert not start_writeback(fd, 0, 0)  # nothing to write
    finally:
        os.close(fd)
    assert not start_writeback(-1, 0, 4096)  # the kernel refused it: the fsync does the work
    assert path.stat().st_size == 1 << 20
