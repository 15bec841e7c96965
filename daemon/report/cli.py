"""``spot-supervisor report``: read a run's ledger and committed checkpoints, write the report.

::

    spot-supervisor report [--config PATH | --remote s3://BUCKET/PREFIX --run-id ID]
                           [--endpoint-url URL] [--region R] [--out DIR]
                           [--price TYPE=USD ...] [--on-demand TYPE=USD ...] [--json]

Writes ``report.json``, ``timeline.png`` and ``report.html`` into ``--out`` (default
``./report-<run.id>/``) and prints the headline figures. Read-only: it never writes to
the bucket. Exit codes: 0 written; 2 usage (a bad flag or config, named); 1 the bucket
could not be read, the run has no ledger, or the picture could not be drawn (the JSON
and the page are still written).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.report import figures as figs
    from daemon.storage.store import CheckpointStore

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """A flag or the config is wrong: exit 2, the message names it."""


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the report's flags to ``p`` (the ``report`` subparser of ``spot-supervisor``)."""
    p.add_argument(
        "--config",
        metavar="PATH",
        help="config file naming the run and its remote (default: $SPOT_SUPERVISOR_CONFIG, "
        "else /etc/spot-supervisor/config.toml); not with --remote",
    )
    p.add_argument(
        "--remote", metavar="s3://BUCKET/PREFIX", help="the run's remote, instead of a config"
    )
    p.add_argument("--run-id", metavar="ID", help="the run (with --remote; overrides run.id)")
    p.add_argument("--endpoint-url", metavar="URL", help="an S3-compatible server")
    p.add_argument("--region", metavar="REGION", help="the bucket's region")
    p.add_argument("--out", metavar="DIR", type=Path, help="default: ./report-<run.id>/")
    p.add_argument(
        "--price",
        metavar="TYPE=USD",
        action="append",
        default=[],
        help="spot price per hour of an instance type, over the ledger's (repeatable)",
    )
    p.add_argument(
        "--on-demand",
        metavar="TYPE=USD",
        action="append",
        default=[],
        help="on-demand price per hour to compare against, over the list price (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print report.json instead of a summary")
    return p


def parse_prices(flag: str, pairs: Sequence[str]) -> dict[str, float]:
    """``TYPE=USD`` flags as a table; a malformed one raises :class:`UsageError` naming it."""
    from daemon.fleet import catalog  # only here: the run path never loads daemon.fleet

    try:
        return catalog.parse_prices(flag, pairs, example="g5.xlarge=0.42", free_ok=True)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _target(args: argparse.Namespace) -> tuple[str, str, str | None, str | None]:
    """(remote, run id, endpoint url, region), from the flags or the config."""
    if args.remote:
        if args.config:
            raise UsageError("--remote and --config: give one of them")
        if not args.run_id:
            raise UsageError("--remote needs --run-id")
        return args.remote, args.run_id, args.endpoint_url, args.region
    from daemon.config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        raise UsageError(f"configuration: {exc}") from exc
    return (
        cfg.checkpoints.remote,
        args.run_id or cfg.run.id,
        args.endpoint_url or cfg.s3.endpoint_url,
        args.region or cfg.s3.region,
    )


def open_store(
    remote: str, run_id: str, endpoint_url: str | None, region: str | None
) -> CheckpointStore:
    """A read-only use of the run's store (the one place that names the storage modules)."""
    from daemon.storage.backend import build_blob_store, is_blob_remote
    from daemon.storage.s3client import make_s3_client, parse_remote
    from daemon.storage.store import CheckpointStore

    if is_blob_remote(remote):
        # GCS or Azure: the same layers over the blob backend, credentials from the
        # environment as the daemon takes them.
        from daemon.config import ConfigError, build

        doc = {
            "run": {"id": run_id, "command": ["true"]},
            "checkpoints": {"local_dir": "/nonexistent", "remote": remote},
        }
        try:
            return build_blob_store(build(doc), max_concurrency=1)
        except ConfigError as exc:
            raise UsageError(str(exc)) from exc
    try:
        location = parse_remote(remote)
    except ValueError as exc:
        raise UsageError(f"--remote: {exc}") from exc
    try:
        return CheckpointStore(make_s3_client(endpoint_url, region), location, run_id)
    except ValueError as exc:  # the run id
        raise UsageError(f"--run-id: {exc}") from exc


def build_report(store: CheckpointStore, pricing: figs.Pricing) -> dict[str, Any] | None:
    """The figures of the store's run (None: it has no ledger). Store errors propagate."""
    from daemon.ledger_format import parse_time
    from daemon.ledger_reader import read_ledger
    from daemon.report import figures as figs

    boots = read_ledger(store)
    if not boots:
        return None
    committed = [
        figs.Committed(
            c.step, c.manifest.reason, parse_time(c.manifest.created_at), c.manifest.total_bytes
        )
        for c in store.list_committed()
    ]
    complete = store.read_complete() is not None
    return figs.compute(boots, committed, run_id=store.run_id, pricing=pricing, complete=complete)


def write_report(figures: dict[str, Any], out: Path) -> tuple[list[Path], str | None]:
    """report.json, timeline.png and report.html in ``out``: the paths written, and why
    the picture is missing (None when it was drawn)."""
    from daemon.report import html, timeline

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    written[0].write_text(json.dumps(figures, indent=2) + "\n")
    problem = None
    try:
        written.append(timeline.render(figures, out / html.IMAGE_NAME))
    except ImportError as exc:
        problem = f"no picture: {exc}; install matplotlib (pip install 'spot-supervisor[demo]')"
    page = out / "report.html"
    page.write_text(html.render(figures, image=None if problem else html.IMAGE_NAME))
    written.append(page)
    return written, problem


def summary(f: dict[str, Any]) -> str:
    """The headline figures, one per line."""
    cost = f["cost"]
    ov = f["overhead"]

    def usd(v: Any) -> str:
        return "unknown" if v is None else f"${v:,.2f}"

    lines = [
        f"run {f['run_id']}: {f['boots']} boot(s) on {f['instances']} instance(s), "
        f"{f['interruptions']} interruption(s)",
        f"wall clock {f['wall_clock_seconds'] / 3600:.2f} h, training "
        f"{f['training_seconds'] / 3600:.2f} h, instance time {f['instance_hours']:.2f} h",
        "goodput " + ("unknown" if f["goodput"] is None else f"{f['goodput']:.1%}"),
        "extra wall clock "
        + (
            "unknown"
            if ov["percent"] is None
            else f"{ov['percent']:.1f}% ({ov['verdict']} the seed's budget of "
            f"{ov['seed_budget_percent'][0]:g}-{ov['seed_budget_percent'][1]:g}%)"
        ),
        f"lost {f['lost_seconds']:.0f} s of training"
        + ("" if f["lost_steps"] is None else f" (about {f['lost_steps']} steps)"),
        f"cost {usd(cost['spot_usd'])} on spot, {usd(cost['on_demand_usd'])} for the same "
        f"hours on demand" + ("" if cost["saving"] is None else f" (saved {cost['saving']:.0%})"),
    ]
    if cost["unpriced"]:
        lines.append("no price for: " + ", ".join(cost["unpriced"]) + " (give --price TYPE=USD)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The command, on parsed flags (``configure_parser``'s)."""
    from daemon import log
    from daemon.report import figures as figs

    log.configure(level="warning", stream=sys.stderr)  # stdout is the summary
    try:
        pricing = figs.Pricing(
            spot=parse_prices("--price", args.price),
            on_demand=parse_prices("--on-demand", args.on_demand),
        )
        remote, run_id, endpoint, region = _target(args)
        store = open_store(remote, run_id, endpoint, region)
    except UsageError as exc:
        print(f"spot-supervisor report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from daemon.ledger_format import ledger_prefix
    from daemon.storage.s3client import StoreError

    try:
        figures = build_report(store, pricing)
    except StoreError as exc:
        print(f"spot-supervisor report: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if figures is None:
        where = store.location.url(ledger_prefix(store))
        print(
            f"spot-supervisor report: no ledger for run {run_id} under {where} "
            "(its supervisors predate the ledger, or the run id or remote is not the run's)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    out = args.out or Path(f"report-{run_id}")
    written, problem = write_report(figures, out)
    print(json.dumps(figures, indent=2) if args.json else summary(figures))
    if not args.json:
        print("wrote " + ", ".join(str(p) for p in written))
    if problem:
        print(f"spot-supervisor report: {problem}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``spot-supervisor report ...`` on its own (``argv`` without the word ``report``)."""
    p = argparse.ArgumentParser(
        prog="spot-supervisor report",
        description="What spot cost a run: report.json, timeline.png and report.html from "
        "the run's ledger and committed checkpoints.",
    )
    configure_parser(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on a usage error, 0 after --help
        return int(exc.code or 0)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
