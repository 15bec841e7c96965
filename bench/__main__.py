"""``python -m bench [NAME ...] [--quick]``: run benchmarks, write results.json and results.md."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import bench
from bench.common import Context, Row, machine
from bench.cost import cost_markdown

HERE = Path(__file__).resolve().parent


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def render_markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    out = [
        f"Measured {meta['when']} on {meta['machine']['platform']}, "
        f"{meta['machine']['cpu_count']} CPUs; medians over the repeats shown.",
        "",
        "| benchmark | server | ours | baseline | ratio | target | size | repeats |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "" if r.met is None else (" ✅" if r.met else " ❌")
        base = f"{_fmt(r.baseline)} {r.unit} ({r.baseline_name})" if r.baseline is not None else "-"
        out.append(
            f"| {r.group}: {r.name} | {r.server} | {_fmt(r.ours)} {r.unit} | {base} | "
            f"{_fmt(r.ratio)} | {(r.target or '-') + met} | {r.size} | {r.repeats} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("names", nargs="*", help="benchmark modules to run (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run)")
    p.add_argument("--out", default=str(HERE), help="directory for results.json / results.md")
    args = p.parse_args(argv)
    available = sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules(bench.__path__)
        if m.name.startswith("bench_")
    )
    names = args.names or available
    unknown = set(names) - set(available)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; have: {', '.join(available)}")
    from daemon import log

    log.configure(level="warning", stream=sys.stderr)  # the stand-ins' events are noise here
    rows: list[Row] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="spot-bench-") as work:
        ctx = Context(workdir=work, quick=args.quick)
        for name in names:
            print(f"== {name}", flush=True)
            mod = importlib.import_module(f"bench.bench_{name}")
            try:
                got = mod.run(ctx)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                continue
            for r in got:
                print(
                    f"   {r.name}: ours {_fmt(r.ours)} {r.unit}, baseline {_fmt(r.baseline)}, "
                    f"ratio {_fmt(r.ratio)}",
                    flush=True,
                )
            rows.extend(got)
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "quick": args.quick,
        "failed": failed,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=2) + "\n"
    )
    md = render_markdown(rows, meta)
    md += "\n### Cost model\n\n" + cost_markdown([r.to_dict() for r in rows])
    (out / "results.md").write_text(md)
    print("\n" + md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
