"""The report's picture, ``timeline.png``: the run over time, one lane per instance.

Drawn from the ``timeline`` part of the figures (:mod:`daemon.report.figures`), so the
picture shows exactly what ``report.json`` says. matplotlib is imported only here, and
only when a picture is drawn (``spot-supervisor run`` never loads it); the Agg canvas is
used directly, without pyplot, so no display and no global figure state are involved.

* x: time (UTC). One lane per instance, labelled with its id, type and lifecycle.
* In each lane: the instance's time, pale, in the colour of its instance type; solid
  where its trainer did work that a committed checkpoint holds; dotted while it waited
  in standby; hatched red where work was lost (from the newest committed checkpoint of
  that boot to the interruption).
* Markers: notices (red triangles, and a dashed red line across the picture;
  rebalance recommendations in orange, other stops in grey), restores (blue), commits
  (black ticks), the first new checkpoint after a start (green), a boot gone without a
  notice or an exit (black cross).
* Second y axis: the newest committed step over time, a step line.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon.ledger_format import parse_time

_MARKERS: dict[str, dict[str, Any]] = {
    # kind -> how it is drawn, and where in the lane (offset from its centre; lanes grow down)
    "notice": {"marker": "v", "color": "#d62728", "s": 90, "dy": -0.36, "label": "notice"},
    "rebalance": {"marker": "v", "color": "#ff7f0e", "s": 60, "dy": -0.36, "label": "rebalance"},
    "stop": {"marker": "v", "color": "#7f7f7f", "s": 60, "dy": -0.36, "label": "stop (operator)"},
    "gone": {"marker": "X", "color": "#111111", "s": 70, "dy": 0.0, "label": "gone, no notice"},
    "restore": {"marker": "^", "color": "#1f77b4", "s": 60, "dy": 0.36, "label": "restore"},
    "commit": {"marker": "|", "color": "#111111", "s": 120, "dy": 0.0, "label": "commit"},
    "first_step": {
        "marker": "o",
        "color": "#2ca02c",
        "s": 36,
        "dy": 0.0,
        "label": "first new checkpoint",
    },
}
_TYPE_COLOURS = (
    "#1f77b4",
    "#9467bd",
    "#17becf",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#7f7f7f",
    "#2ca02c",
)
_BAR = 0.56  # lane bar height (lanes are 1 apart)


def _t(value: object) -> dt.datetime:
    t = parse_time(value)
    if t is None:
        raise ValueError(f"not a time: {value!r}")
    return t


def render(figures: Mapping[str, Any], path: Path, *, dpi: int = 110) -> Path:
    """Draw ``figures["timeline"]`` into a PNG at ``path``; returns ``path``."""
    # The Agg canvas itself, not pyplot: no backend switch in the caller's process.
    from matplotlib import dates as mdates
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    tl = figures["timeline"]
    lanes: Sequence[Mapping[str, Any]] = tl["lanes"]
    n = max(len(lanes), 1)
    fig = Figure(figsize=(12.0, 2.6 + 0.75 * n), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    def x(value: object) -> float:
        return float(mdates.date2num(_t(value)))  # type: ignore[no-untyped-call]

    def spans(pairs: Sequence[Sequence[str]]) -> list[tuple[float, float]]:
        return [(x(s), x(e) - x(s)) for s, e in pairs]

    colours: dict[str, str] = {}
    for lane in lanes:
        key = str(lane.get("instance_type") or "unknown type")
        colours.setdefault(key, _TYPE_COLOURS[len(colours) % len(_TYPE_COLOURS)])

    for i, lane in enumerate(lanes):
        colour = colours[str(lane.get("instance_type") or "unknown type")]
        box = (i - _BAR / 2, _BAR)
        ax.broken_barh(spans(lane["intervals"]), box, facecolors=colour, alpha=0.22)
        ax.broken_barh(spans(lane["training"]), box, facecolors=colour, alpha=0.9)
        if lane.get("standby"):
            ax.broken_barh(
                spans(lane["standby"]),
                box,
                facecolors="none",
                edgecolors=colour,
                hatch="..",
                linewidth=0.0,
            )
        if lane["lost"]:
            ax.broken_barh(
                spans(lane["lost"]),
                box,
                facecolors="none",
                edgecolors="#d62728",
                hatch="////",
                linewidth=1.0,
            )

    for kind, style in _MARKERS.items():
        pts = [m for m in tl["markers"] if m["kind"] == kind]
        if pts:
            ax.scatter(
                [x(m["t"]) for m in pts],
                [m["lane"] + style["dy"] for m in pts],
                marker=style["marker"],
                color=style["color"],
                s=style["s"],
                zorder=4,
                linewidths=1.6 if style["marker"] == "|" else 0.8,
            )
    for at in tl.get("interruptions", []):
        ax.axvline(x(at), color="#d62728", linestyle="--", linewidth=0.9, alpha=0.7, zorder=1)

    ax.set_ylim(n - 0.5, -0.5)  # first instance on top
    ax.set_yticks(
        range(len(lanes)),
        labels=[
            f"{lane['lane']}\n{lane.get('instance_type') or '?'} · {lane.get('lifecycle') or '?'}"
            for lane in lanes
        ],
        fontsize=8,
    )
    # A little room at both ends: markers at the first and last second stay whole.
    lo, hi = x(tl["start"]), x(tl["end"])
    pad = (hi - lo) * 0.015 or 1 / 1440
    ax.set_xlim(lo - pad, hi + pad)
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    concise = mdates.ConciseDateFormatter(locator, tz=dt.timezone.utc)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_formatter(concise)
    ax.set_xlabel("time (UTC)")
    ax.grid(axis="x", alpha=0.3)

    steps = tl["committed_steps"]
    ax2 = ax.twinx()
    if steps:
        xs = [x(s[0]) for s in steps] + [x(tl["end"])]
        ys = [s[1] for s in steps] + [steps[-1][1]]
        ax2.plot(xs, ys, drawstyle="steps-post", color="#333333", linewidth=1.6, zorder=5)
        ax2.set_ylim(0, max(ys) * 1.08 or 1)
    ax2.set_ylabel("newest committed step")

    ov = figures.get("overhead", {})
    goodput = figures.get("goodput")
    title = f"run {figures.get('run_id')}: {figures.get('interruptions')} interruption(s)"
    if goodput is not None:
        title += f", goodput {goodput:.0%}"
    if ov.get("percent") is not None:
        low, high = ov["seed_budget_percent"]
        title += f", extra wall clock {ov['percent']:.1f}% (seed's budget {low:g}–{high:g}%)"
    ax.set_title(title, fontsize=10)

    handles: list[Any] = [
        Patch(facecolor=c, alpha=0.9, label=f"{t}: training kept") for t, c in colours.items()
    ]
    handles += [
        Patch(facecolor="#999999", alpha=0.25, label="instance up"),
        Patch(facecolor="none", edgecolor="#d62728", hatch="////", label="work lost"),
        *(
            [Patch(facecolor="none", edgecolor="#555555", hatch="..", label="standby")]
            if any(lane.get("standby") for lane in lanes)
            else []
        ),
        Line2D([], [], color="#333333", drawstyle="steps-post", label="committed step"),
    ]
    present = {m["kind"] for m in tl["markers"]}
    handles += [
        Line2D([], [], linestyle="", marker=s["marker"], color=s["color"], label=s["label"])
        for kind, s in _MARKERS.items()
        if kind in present
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=5, fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
