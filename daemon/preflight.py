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


class CheckWarning(Exception):
    """Not a failure (the daemon works), but something the operator should change:
    printed as ``WARN``, not counted in the exit status."""


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
    provider = cfg.imds.provider
    if provider == "gcp":
        return _check_gcp_metadata(cfg)
    if provider == "azure":
        return _check_azure_metadata(cfg)
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


def _check_gcp_metadata(cfg: Config) -> str:
    from daemon.notices.gcp import FLAVOR_HEADER, PREEMPTED_PATH
    from daemon.notices.imds import MetadataUnavailable
    from daemon.notices.metadata_http import MetadataHttp

    http = MetadataHttp(cfg.imds.url, FLAVOR_HEADER)
    try:
        answer = http.request("GET", PREEMPTED_PATH)
    except MetadataUnavailable as exc:
        raise CheckFailed(f"GCE metadata server at {cfg.imds.url}: {exc}") from None
    finally:
        http.close()
    if answer.status != 200 or answer.body.strip() not in ("TRUE", "FALSE"):
        raise CheckFailed(
            f"GCE metadata server at {cfg.imds.url}: {PREEMPTED_PATH} answered HTTP"
            f" {answer.status} {answer.body.strip()[:40]!r} (not a spot or preemptible VM?)"
        )
    state = "PREEMPTED" if answer.body.strip() == "TRUE" else "not preempted"
    return f"{cfg.imds.url} answers as the GCE metadata server ({state})"


def _check_azure_metadata(cfg: Config) -> str:
    from daemon.notices.azure import EVENTS_PATH, METADATA_HEADER, parse_document
    from daemon.notices.imds import MetadataUnavailable
    from daemon.notices.metadata_http import MetadataHttp

    # The first call may take minutes while Scheduled Events enables itself: give it
    # a while (check is run by hand), and say so if it is still not answered.
    http = MetadataHttp(cfg.imds.url, METADATA_HEADER, read_timeout=30.0)
    try:
        answer = http.request("GET", EVENTS_PATH)
        if answer.status != 200:
            raise MetadataUnavailable(EVENTS_PATH, f"HTTP {answer.status}", status=answer.status)
        _incarnation, events = parse_document(answer.body)
    except MetadataUnavailable as exc:
        raise CheckFailed(
            f"Azure Scheduled Events at {cfg.imds.url}: {exc} (the first call after boot can"
            " take up to two minutes: run check again)"
        ) from None
    finally:
        http.close()
    return f"{cfg.imds.url} answers Scheduled Events ({len(events)} event(s) pending)"


def check_bucket(cfg: Config) -> str:
    from daemon.storage.s3client import StoreError
    from daemon.stores import build_store

    try:
        store = build_store(cfg)
        store.check_writable()
        complete = store.read_complete()
        steps = store.list_committed()
    except StoreError as exc:
        raise CheckFailed(str(exc)) from None
    state = "complete" if complete else f"{len(steps)} committed checkpoint(s)"
    return f"{cfg.checkpoints.remote}/{cfg.run.id} writable ({state})"


def check_notice_budget(cfg: Config) -> str:
    """Does the newest checkpoint upload within this cloud's notice? (WARN if not.)"""
    from daemon.budget import cadence_of, local_cadence, notice_budget
    from daemon.layout import list_step_dirs, read_manifest
    from daemon.notices.base import PROVIDER_NOTICE_S
    from daemon.state import read_state
    from daemon.storage.s3client import StoreError
    from daemon.stores import build_store

    nbytes, cadence, where = 0, None, "none yet"
    try:
        committed = build_store(cfg).list_committed()[:2]
    except StoreError:
        committed = []  # the bucket check reports why
    if committed:
        nbytes = committed[0].manifest.total_bytes
        cadence = cadence_of([c.manifest for c in committed])
        where = f"step {committed[0].step} in storage"
    else:
        local = list_step_dirs(cfg.checkpoints.local_dir)
        if local:
            try:
                nbytes = read_manifest(local[0][1]).total_bytes
                cadence = local_cadence(cfg.checkpoints.local_dir)
                where = f"step {local[0][0]} on local disk"
            except (ValueError, OSError):
                pass
    if not nbytes:
        return f"no checkpoint yet to compare with a {cfg.imds.provider} notice"
    bps: float | None = None
    try:
        mbps = read_state(cfg.state_file).get("last_upload_mbps")
        bps = float(mbps) * 1e6 if mbps else None
    except (OSError, ValueError, TypeError, AttributeError):
        bps = None  # no daemon has measured one here: the default guess
    budget = notice_budget(
        cfg.imds.provider,
        PROVIDER_NOTICE_S[cfg.imds.provider],
        nbytes,
        bps,
        cfg.daemon.safety_margin,
        cadence,
    )
    if not budget.fits:
        raise CheckWarning(f"{where}: {budget.describe()}")
    return f"{where}: {budget.describe()}"


CHECKS: list[tuple[str, Callable[[Config], str]]] = [
    ("local dir", check_local_dir),
    ("command", check_command),
    ("metadata", check_metadata),
    ("bucket", check_bucket),
    ("notice budget", check_notice_budget),
]


def run_checks(cfg: Config) -> int:
    """Print ``ok``/``WARN``/``FAIL`` per check, running every one; 1 when any failed
    (a warning is not a failure), else 0."""
    failed = 0
    for name, check in CHECKS:
        try:
            detail = check(cfg)
        except CheckFailed as exc:
            print(f"FAIL {name}: {exc}", flush=True)
            failed += 1
            continue
        except CheckWarning as exc:
            print(f"WARN {name}: {exc}", flush=True)
            continue
        except Exception as exc:  # a check that crashes must not hide the ones after it
            print(f"FAIL {name}: unexpected {type(exc).__name__}: {exc}", flush=True)
            failed += 1
            continue
        print(f"ok   {name}: {detail}", flush=True)
    return 1 if failed else 0
