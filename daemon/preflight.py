"""``spot-supervisor check``: one line per preflight check, every check run.

A failed check does not hide the others: an operator fixing a new instance sees every
problem in one run, not one per attempt. The exit status is 1 when any hard check
failed (exit 2, a bad config, is decided before these run, in the CLI).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from daemon.config import Config

# Below this much free space a large checkpoint will not fit; warn, do not fail.
_LOW_SPACE_BYTES = 10 * 1024**3


class CheckFailed(Exception):
    """A hard failure: the daemon could not do its job with this setup."""


def check_local_dir(cfg: Config) -> str:
    d = cfg.checkpoints.local_dir
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".tmp-check-{uuid.uuid4().hex}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise CheckFailed(f"{d} is not writable: {exc.strerror or exc}") from None
    free = shutil.disk_usage(d).free
    note = " (low: a large checkpoint may not fit)" if free < _LOW_SPACE_BYTES else ""
    return f"{d} writable, {free / 1024**3:.1f} GiB free{note}"


def check_command(cfg: Config) -> str:
    prog = cfg.run.command[0]
    cwd = cfg.run.workdir
    if cwd is not None and not cwd.is_dir():
        raise CheckFailed(f"run.workdir {cwd} is not a directory")
    if os.sep in prog:
        path = Path(prog) if Path(prog).is_absolute() else (cwd or Path.cwd()) / prog
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise CheckFailed(f"run.command[0] {prog} is not an executable file")
        return f"{path} is executable{_as_user(cfg)}"
    found = shutil.which(prog, path=cfg.run.env.get("PATH", os.environ.get("PATH")))
    if found is None:
        raise CheckFailed(f"run.command[0] {prog!r} is not on PATH")
    return f"{prog} resolves to {found}{_as_user(cfg)}"


def _as_user(cfg: Config) -> str:
    """`` as <user> (uid, gid, groups)`` when run.user is set (check_paths resolved it)."""
    if cfg.run.user is None:
        return ""
    from daemon.runas import resolve

    return f", runs as {resolve(cfg.run.user, cfg.run.group).describe()}"


def check_metadata(cfg: Config) -> str:
    from daemon.notices.imds import INSTANCE_ACTION_PATH, ImdsClient, MetadataUnavailable

    client = ImdsClient(cfg.imds.url, token_ttl=cfg.imds.token_ttl)
    try:
        status, _body = client.get(INSTANCE_ACTION_PATH)
    except MetadataUnavailable as exc:
        raise CheckFailed(f"metadata service at {cfg.imds.url}: {exc}") from None
    finally:
        client.close()
    notice = "a notice is pending" if status == 200 else "no notice pending"
    return f"{cfg.imds.url} answers IMDSv2 ({notice})"


def check_bucket(cfg: Config) -> str:
    from daemon.storage.s3client import StoreError
    from daemon.supervisor import build_store

    try:
        store = build_store(cfg)
        store.check_writable()
        complete = store.read_complete()
        steps = store.list_committed()
    except StoreError as exc:
        raise CheckFailed(str(exc)) from None
    state = "complete" if complete else f"{len(steps)} committed checkpoint(s)"
    return f"{cfg.checkpoints.remote}/{cfg.run.id} writable ({state})"


CHECKS: list[tuple[str, Callable[[Config], str]]] = [
    ("local dir", check_local_dir),
    ("command", check_command),
    ("metadata", check_metadata),
    ("bucket", check_bucket),
]


def run_checks(cfg: Config) -> int:
    """Print ``ok``/``FAIL`` per check, running every one; 1 when any failed, else 0."""
    failed = 0
    for name, check in CHECKS:
        try:
            detail = check(cfg)
        except CheckFailed as exc:
            print(f"FAIL {name}: {exc}", flush=True)
            failed += 1
            continue
        except Exception as exc:  # a check that crashes must not hide the ones after it
            print(f"FAIL {name}: unexpected {type(exc).__name__}: {exc}", flush=True)
            failed += 1
            continue
        print(f"ok   {name}: {detail}", flush=True)
    return 1 if failed else 0
