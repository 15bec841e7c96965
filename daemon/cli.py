"""``spot-supervisor``: the one console script (CONTRACT §1).

Exit codes: 0 clean; 2 bad configuration or usage (the message names the key or
flag); anything else non-zero is a runtime failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from daemon import __version__
from daemon.config import Config, ConfigError, check_paths, load

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on usage errors, as we want
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"spot-supervisor: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="spot-supervisor",
        description="Carries a spot interruption notice into the training process and races "
        "a verified checkpoint into S3 before the deadline.",
    )
    p.add_argument("--version", action="version", version=f"spot-supervisor {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument(
            "--config",
            metavar="PATH",
            help="config file (default: $SPOT_SUPERVISOR_CONFIG, else "
            "/etc/spot-supervisor/config.toml)",
        )
        return sp

    with_config("run", "the daemon: restore, train, watch for notices, sync, shut down in order")
    with_config("restore", "pull the newest committed checkpoint into the local dir, verify, exit")
    with_config("sync", "commit every complete local checkpoint that is not yet remote, exit")
    st = with_config("status", "what the running daemon is doing")
    st.add_argument("--json", action="store_true", help="print state.json as JSON")
    with_config("check", "preflight: config, metadata service, bucket, local dir, command")
    demo = sub.add_parser(
        "demo",
        help="the whole story on this machine with local stand-ins (no cloud account)",
        description="Boot, train, notice, emergency commit, restore on an empty disk, resume, "
        "complete: against a local metadata emulator and a local S3 server.",
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo's temporary directory")
    return p


def _load_config(args: argparse.Namespace) -> Config:
    return load(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_config(args)  # first: a bad config is exit 2 before anything heavy loads
    check_paths(cfg)
    from daemon import log
    from daemon.supervisor import Supervisor

    log.configure()
    return Supervisor(cfg).run()


def cmd_restore(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from daemon import log
    from daemon.supervisor import build_store

    log.configure()
    store = build_store(cfg)
    complete = store.read_complete()
    if complete is not None:
        print(f"run {cfg.run.id} is complete (step {complete.get('step')}): nothing to restore")
        return EXIT_OK
    result = store.restore_newest(cfg.checkpoints.local_dir)
    if result is None:
        print(f"no committed checkpoint for run {cfg.run.id}: nothing restored")
    else:
        how = "restored" if result.downloaded else "kept the newer local"
        print(f"{how} step {result.step} in {result.path}")
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    from daemon import log
    from daemon.deadline import ThroughputEstimate
    from daemon.supervisor import build_store
    from daemon.sync import CheckpointSync

    log.configure()
    sync = CheckpointSync(
        build_store(cfg), cfg.checkpoints.local_dir, ThroughputEstimate(), rescan_interval=1.0
    )
    sync.load_remote()
    newest = sync.flush(skip_superseded=False)
    print(
        f"committed {sync.stats.committed} checkpoint(s); newest committed step: {newest}; "
        f"failures: {sync.stats.failures}"
    )
    return EXIT_FAILURE if sync.stats.failures else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.status import render_status

    cfg = _load_config(args)
    text, code = render_status(cfg, as_json=args.json)
    print(text)
    return code


def cmd_check(args: argparse.Namespace) -> int:
    from daemon.preflight import run_checks

    try:
        cfg = _load_config(args)
        check_paths(cfg)
    except ConfigError as exc:
        print(f"FAIL config: {exc}")
        return EXIT_USAGE
    from daemon import log

    log.configure(level="warning", stream=sys.stderr)  # stdout is the one-line-per-check report
    print(f"ok   config: {cfg.source}")
    return run_checks(cfg)


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    return run_demo(keep=args.keep)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "restore": cmd_restore,
    "sync": cmd_sync,
    "status": cmd_status,
    "check": cmd_check,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"spot-supervisor: configuration error: {exc}", file=sys.stderr)
        print(json.dumps({"event": "config_invalid", "error": str(exc)}), file=sys.stdout)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from daemon.s3client import StoreError

        if not isinstance(exc, StoreError):
            raise
        # Object storage said no (or the local side of a transfer failed): one clear line.
        print(f"spot-supervisor {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
