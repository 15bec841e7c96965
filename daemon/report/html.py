"""``report.html``: one self-contained page for the figures, beside ``timeline.png``.

Inline CSS, no JavaScript, no external URL: it opens from a bucket, a laptop or a CI
artifact alike. Every value is HTML-escaped (instance ids and reasons come from a
bucket anyone with write access could have written).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from html import escape
from typing import Any

IMAGE_NAME = "timeline.png"

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       margin: 24px auto; max-width: 1280px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin: 0 0 16px; }
img.timeline { width: 100%; max-width: 1320px; border: 1px solid #ddd; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border-bottom: 1px solid #e6e6e6; padding: 4px 10px; text-align: left;
         vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.how { color: #666; font-size: 12.5px; max-width: 640px; }
.verdict-over { color: #b00020; font-weight: 600; }
.verdict-within, .verdict-under { color: #1b7f3b; font-weight: 600; }
.rows td { font-size: 12.5px; white-space: nowrap; }
.notes li { color: #555; }
"""


def _dur(seconds: Any) -> str:
    if seconds is None:
        return "unknown"
    s = float(seconds)
    if abs(s) < 120:
        return f"{s:.1f} s"
    if abs(s) < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _when(value: Any) -> str:
    """``2026-12-01 10:25:30``: the tables' times (UTC, said in the headers), to the second."""
    text = str(value)
    return text[:19].replace("T", " ") if len(text) >= 19 and text[10] == "T" else text


def _usd(value: Any) -> str:
    return "unknown" if value is None else f"${float(value):,.2f}"


def _pct(value: Any) -> str:
    return "unknown" if value is None else f"{float(value) * 100:.1f} %"


def _cell(value: Any) -> str:
    if value is None:
        return "<td>–</td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, (int, float)):
        return f'<td class="num">{escape(str(value))}</td>'
    return f"<td>{escape(str(value))}</td>"


class Markup(str):
    """Text that is HTML already (built here from escaped parts)."""


def _html(text: str) -> str:
    return text if isinstance(text, Markup) else escape(text)


Column = tuple[str, str, Callable[[Any], str] | None]


def _table(columns: Sequence[Column], rows: Iterable[Mapping[str, Any]]) -> str:
    """A table with one row per mapping: each column's header, key and (for a value that
    is not None) how to show it."""
    head = "".join(f"<th>{escape(h)}</th>" for h, _, _ in columns)
    body = "".join(
        "<tr>"
        + "".join(
            _cell(show(row.get(key)) if show and row.get(key) is not None else row.get(key))
            for _, key, show in columns
        )
        + "</tr>"
        for row in rows
    )
    return (
        f'<div class="scroll"><table class="rows"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def render(figures: Mapping[str, Any], *, image: str | None = IMAGE_NAME) -> str:
    """The page for ``figures`` (as :func:`daemon.report.figures.compute` returns them)."""
    f = figures
    cost = f["cost"]
    ov = f["overhead"]
    run = escape(str(f["run_id"]))
    lo, hi = ov["seed_budget_percent"]
    verdict = ov.get("verdict")
    overhead_text = (
        "unknown (no training recorded)" if ov.get("percent") is None else f"{ov['percent']:.1f} %"
    )
    seed_line = (
        f'<span class="verdict-{escape(str(verdict))}">{escape(str(verdict))}</span> '
        f"the seed's budget of {lo:g}–{hi:g} %"
        if verdict
        else ""
    )
    state = {True: "complete", False: "not complete", None: "completion not checked"}[
        f.get("complete")
    ]
    figure_rows = [
        (
            "Wall clock",
            _dur(f["wall_clock_seconds"]),
            "From the first instance's start (its boot, before the supervisor) to the last "
            "event recorded.",
        ),
        (
            "Training time",
            _dur(f["training_seconds"]),
            "Time in which work was done that a committed checkpoint holds.",
        ),
        (
            "Extra wall clock",
            Markup(escape(overhead_text) + (f" — {seed_line}" if seed_line else "")),
            "(wall clock − training time) / training time, against the seed article's "
            "“budget for about 10–15% extra wall-clock time”.",
        ),
        (
            "Instance hours",
            f"{f['instance_hours']:.3f} h on {f['instances']} instance(s), {f['boots']} boot(s)",
            "Every instance's time, summed.",
        ),
        ("Goodput", _pct(f["goodput"]), "Training instance time / instance time."),
        (
            "Interruptions",
            str(f["interruptions"]),
            "Notices that took a training instance, and training instances gone without one."
            + (
                f" Plus {f['standby_interruptions']} on standby instances (nothing lost)."
                if f.get("standby_interruptions")
                else ""
            ),
        ),
        (
            "Lost work",
            f"{_dur(f['lost_seconds'])}, "
            + ("unknown steps" if f["lost_steps"] is None else f"about {f['lost_steps']} steps"),
            "From the newest committed checkpoint of an interrupted boot to its notice; "
            "steps at the boot's measured rate.",
        ),
        (
            "Recovery",
            f"mean {_dur(f['recovery_seconds_mean'])}, max {_dur(f['recovery_seconds_max'])}",
            "From each notice to the next boot's first new checkpoint.",
        ),
        (
            "Cost on spot",
            _usd(cost["spot_usd"]),
            "Each instance's hours at its price (--price, else the ledger's; an on-demand "
            "instance at its on-demand price).",
        ),
        (
            "Same hours on demand",
            _usd(cost["on_demand_usd"]),
            "The same instance hours at on-demand prices (--on-demand, else the dated list "
            "prices).",
        ),
        ("Saving", _pct(cost["saving"]), "1 − spot / on demand, over instances priced both ways."),
        (
            "Training alone on demand",
            _usd(cost["on_demand_training_usd"]),
            "Only the training time, at on-demand prices: an on-demand run without interruptions.",
        ),
        (
            "Newest committed step",
            "none" if f["newest_committed_step"] is None else str(f["newest_committed_step"]),
            state,
        ),
    ]
    figures_table = (
        "<table><thead><tr><th>figure</th><th>value</th><th>how</th></tr></thead><tbody>"
        + "".join(
            f"<tr><th>{escape(name)}</th><td>{_html(value)}</td>"
            f'<td class="how">{escape(how)}</td></tr>'
            for name, value, how in figure_rows
        )
        + "</tbody></table>"
    )
    interruptions = _table(
        [
            ("at (UTC)", "at", _when),
            ("instance", "instance_id", None),
            ("type", "instance_type", None),
            ("cause", "cause", None),
            ("action", "action", None),
            ("saved step", "saved_step", None),
            ("lost", "lost_seconds", _dur),
            ("lost steps", "lost_steps", None),
            ("recovery", "recovery_seconds", _dur),
            ("trainer restarted after", "resumed_seconds", _dur),
            ("recovered by boot", "recovered_by", None),
        ],
        f["per_interruption"],
    )
    instances = _table(
        [
            ("instance", "lane", None),
            ("type", "instance_type", None),
            ("zone", "availability_zone", None),
            ("lifecycle", "lifecycle", None),
            ("boots", "boots", None),
            ("time", "seconds", _dur),
            ("price/h", "price_usd_per_hour", _usd),
            ("price from", "price_source", None),
            ("cost", "usd", _usd),
            ("on demand/h", "on_demand_usd_per_hour", _usd),
            ("same hours on demand", "on_demand_usd", _usd),
        ],
        f["per_instance"],
    )
    boots = _table(
        [
            ("boot", "boot_id", None),
            ("instance", "instance_id", None),
            ("type", "instance_type", None),
            ("zone", "availability_zone", None),
            ("lifecycle", "lifecycle", None),
            ("node", "node_id", None),
            ("slot", "slot", None),
            ("start (UTC)", "start", _when),
            ("time", "seconds", _dur),
            ("restored step", "restored_step", None),
            ("restore", "restore_seconds", _dur),
            ("standby", "standby", None),
            ("handoff", "handoff_seconds", _dur),
            ("training kept", "training_seconds", _dur),
            ("commits", "commits", None),
            ("last committed", "last_committed_step", None),
            ("notice", "notice", lambda n: f"{n['action']} at {_when(n['t'])}"),
            ("stop", "stop_reason", None),
            ("exit", "exit_code", None),
        ],
        [
            {**b, "exit_code": "gone, no exit" if b["vanished"] else b["exit_code"]}
            for b in f["per_boot"]
        ],
    )
    notes = "".join(f"<li>{escape(n)}</li>" for n in f.get("notes", []))
    picture = (
        f'<img class="timeline" src="{escape(image)}" alt="Timeline of run {run}: one lane '
        'per instance, notices, commits, restores, lost work and the committed step">'
        if image
        else "<p>(No picture: matplotlib is not installed.)</p>"
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>spot-supervisor report: {run}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>What spot cost run {run}</h1>
<p class="sub">{escape(_when(f["started_at"]))} to {escape(_when(f["ended_at"]))} UTC ·
{escape(state)} · generated {escape(_when(f["generated_at"]))} UTC · the same figures are in
report.json</p>
{picture}
<h2>Figures</h2>
{figures_table}
<h2>Interruptions</h2>
{interruptions if f["per_interruption"] else "<p>None.</p>"}
<h2>Instances</h2>
{instances}
<h2>Boots</h2>
{boots}
{f'<h2>Notes</h2><ul class="notes">{notes}</ul>' if notes else ""}
</body>
</html>
"""
