"""``spot-supervisor``: the one console script (CONTRACT §1).

Exit codes: 0 clean; 2 bad configuration or usage (the message names the key or
flag); anything else non-zero is a runtime failure.
"""

from __future__ import annotations

import argparse
import json
import os
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
    demo.add_argument(
        "--cloud",
        choices=("aws", "gcp", "azure"),
        default="aws",
        help="whose notices and storage to stand in for: aws (IMDSv2 emulator, moto's S3),"
        " gcp (GCE metadata emulator, gcp-storage-emulator), azure (Scheduled Events"
        " emulator, Azurite; needs node); default aws",
    )

    # The fleet side (daemon/fleet/): run on an operator's machine, never on the run path.
    ud = with_config(
        "user-data",
        "cloud-init user-data that installs this config and starts the unit "
        "(or, with --cfn-parameters, the stack's parameters)",
    )
    ud.add_argument(
        "--cfn-parameters",
        action="store_true",
        help="print RunId=... Bucket=... Prefix=... Nodes=... RunConfig=... for "
        "`aws cloudformation deploy --parameter-overrides` (deploy/aws/spot-training.yaml)",
    )
    doc = sub.add_parser(
        "doctor",
        help="why a fleet does not run: scaling activities, spot prices, offerings, quotas",
        description="Reads the Auto Scaling group's scaling activities, the spot price "
        "history and instance type offerings of the ladder's types, the Spot vCPU quotas and "
        "the launch template's AMI; one line per finding, each failure with its fix. "
        "Exit 0: nothing failed; 1: something did (or AWS could not be asked).",
    )
    doc.add_argument(
        "--asg", metavar="NAME", help="the Auto Scaling group (the stack's SpotGroupName output)"
    )
    doc.add_argument(
        "--types", metavar="T1,T2,...", help="instance types to check (default: the group's ladder)"
    )
    doc.add_argument("--region", metavar="REGION", help="default: the AWS configuration's region")
    doc.add_argument(
        "--nodes", type=int, metavar="N", help="instances the run needs (default: group's desired)"
    )
    doc.add_argument("--json", action="store_true", help="the findings as JSON")
    pr = sub.add_parser(
        "prices",
        help="spot and on-demand prices per region and AZ, and the saving",
        description="The current spot price of each type in each Availability Zone, against "
        "the on-demand list price (daemon/fleet/catalog.py, dated), and the saving.",
    )
    pr.add_argument("--types", metavar="T1,T2,...", required=True, help="instance types")
    pr.add_argument(
        "--regions", metavar="R1,R2,...", help="regions (default: the AWS configuration's region)"
    )
    pr.add_argument(
        "--on-demand",
        metavar="TYPE=USD",
        action="append",
        default=[],
        help="an on-demand price per hour to compare against instead of the table's (repeatable)",
    )
    pr.add_argument("--json", action="store_true", help="the prices as JSON")
    from daemon.report.cli import configure_parser as configure_report

    configure_report(
        sub.add_parser(
            "report",
            help="what spot cost a run: report.json, timeline.png, report.html from its ledger",
            description="Reads the run's ledger and committed checkpoints (read-only) and "
            "writes report.json, timeline.png and report.html into --out.",
        )
    )
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
    from daemon.stores import build_store

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
    from daemon.storage.sync import CheckpointSync
    from daemon.stores import build_store

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
    from daemon.standins.demo import run_demo

    return run_demo(keep=args.keep, cloud=args.cloud)


def cmd_user_data(args: argparse.Namespace) -> int:
    from daemon.config import resolve_path
    from daemon.fleet.userdata import UserDataError, launch_from_file

    path = resolve_path(args.config, os.environ)
    try:
        launch = launch_from_file(path)
    except UserDataError as exc:
        print(f"spot-supervisor user-data: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.cfn_parameters:
        print(" ".join(f"{k}={v}" for k, v in launch.cfn_parameters().items()))
    else:
        sys.stdout.write(launch.user_data())
    return EXIT_OK


def _aws_session(region: str | None) -> Any:
    import boto3

    return boto3.session.Session(region_name=region) if region else boto3.session.Session()


def cmd_doctor(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from daemon.fleet.catalog import parse_instance_types, parse_regions
    from daemon.fleet.doctor import Doctor

    try:
        types = parse_instance_types("--types", args.types)
        parse_regions("--region", args.region)
    except ValueError as exc:
        return _usage(str(exc))
    if not args.asg and not types:
        return _usage("doctor: give --asg NAME, --types TYPE,..., or both")
    if args.nodes is not None and args.nodes < 1:
        return _usage("--nodes: must be at least 1")
    session = _aws_session(args.region)
    region = session.region_name
    if not region:
        return _usage("--region: none given and none in the AWS configuration")
    doctor = Doctor(
        region,
        session.client("autoscaling"),
        session.client("ec2"),
        session.client("service-quotas"),
    )
    try:
        doctor.run(args.asg, types, args.nodes)
    except (ClientError, BotoCoreError) as exc:
        # What was found so far still helps (e.g. the group was read, then access denied).
        print(doctor.report())
        print(f"spot-supervisor doctor: cannot ask AWS in {region}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(doctor.as_json() if args.json else doctor.report())
    return EXIT_FAILURE if doctor.failed else EXIT_OK


def cmd_prices(args: argparse.Namespace) -> int:
    from daemon.fleet import prices
    from daemon.fleet.catalog import parse_instance_types, parse_regions

    try:
        types = parse_instance_types("--types", args.types)
        regions = parse_regions("--regions", args.regions)
        on_demand = prices.parse_on_demand(args.on_demand)
    except ValueError as exc:
        return _usage(str(exc))
    if not types:
        return _usage("--types: give at least one instance type")
    if not regions:
        default = _aws_session(None).region_name
        if not default:
            return _usage("--regions: none given and none in the AWS configuration")
        regions = [default]
    found = prices.collect(lambda r: _aws_session(r).client("ec2"), regions, types, on_demand)
    print(prices.as_json(found) if args.json else prices.render(found, on_demand))
    return EXIT_FAILURE if any(r.error for r in found) else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from daemon.report.cli import run

    return run(args)


def _usage(message: str) -> int:
    print(f"spot-supervisor: error: {message}", file=sys.stderr)
    return EXIT_USAGE


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "restore": cmd_restore,
    "sync": cmd_sync,
    "status": cmd_status,
    "check": cmd_check,
    "demo": cmd_demo,
    "user-data": cmd_user_data,
    "doctor": cmd_doctor,
    "prices": cmd_prices,
    "report": cmd_report,
}


def _without_rich() -> None:
    """structlog renders exceptions with ``rich`` whenever it can import it, and other
    packages of the same environment (transformers, accelerate) install it: 4 MB of
    modules (rich, pygments, attrs) in a daemon whose logs are JSON for journald. Hidden
    from this process, only when it is the daemon's own (structlog not yet imported), so
    an importer of :func:`main` (a test) keeps its ``rich``."""
    if "structlog" not in sys.modules:
        sys.modules.setdefault("rich", None)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    _without_rich()
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
        from daemon.storage.s3client import StoreError

        if not isinstance(exc, StoreError):
            raise
        # Object storage said no (or the local side of a transfer failed): one clear line.
        print(f"spot-supervisor {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
