"""``python -m bench.render [results.json ...]``: the README's benchmark table, from results.

The README's table is never typed by hand: it is this output for
``docs/bench-results.json`` (the kept run; default). Several files are merged in order,
a later file's rows replacing an earlier one's of the same group (each row's ratio is
always from one run); the meta says which groups came from which run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from bench.__main__ import render_markdown
from bench.common import Row
from bench.cost import cost_markdown

DEFAULT = Path(__file__).resolve().parent.parent / "docs" / "bench-results.json"


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of every doc, a later doc's groups replacing an earlier doc's."""
    rows: list[dict[str, Any]] = []
    origin: dict[str, int] = {}  # group -> the doc its rows come from
    for i, doc in enumerate(docs):
        groups = {r["group"] for r in doc["rows"]}
        rows = [r for r in rows if r["group"] not in groups] + doc["rows"]
        origin.update(dict.fromkeys(groups, i))
    meta = dict(docs[-1]["meta"])
    if len(docs) > 1:
        # Each run named with the groups it still supplies (a later run replaced the rest).
        meta["runs"] = [
            {
                "when": doc["meta"]["when"],
                "platform": doc["meta"]["machine"]["platform"],
                "groups": sorted(g for g, o in origin.items() if o == i),
            }
            for i, doc in enumerate(docs)
            if i in origin.values()
        ]
    return {"meta": meta, "rows": rows}


def to_row(d: dict[str, Any]) -> Row:
    names = {f.name for f in fields(Row)}
    return Row(**{k: v for k, v in d.items() if k in names})


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    md = render_markdown([to_row(r) for r in doc["rows"]], meta)
    for run in meta.get("runs", []):
        # A run on another VM build than the header's says so: the VM's speed differs.
        elsewhere = run.get("platform", meta["machine"]["platform"]) != meta["machine"]["platform"]
        on = f" on {run['platform']}" if elsewhere else ""
        md += f"\n{', '.join(run['groups'])}: run of {run['when']}{on}."
    if meta.get("runs"):
        md += "\n"
    return md + "\n#### Cost model\n\n" + cost_markdown(doc["rows"])


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [DEFAULT]
    print(markdown(merge([json.loads(p.read_text()) for p in paths])), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
