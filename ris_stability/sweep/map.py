"""The stability map of a sweep: every pair of swept parameters, one point per trial, coloured by what
happened to it (stable, non-finite steps, pruned and by which rule, failed)."""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ris_stability.report.canvas import LEGEND_FONT, new_figure

# outcome -> (colour, marker); red stays "broken by a tie / non-finite" as in the run reports.
OUTCOME_STYLES: dict[str, tuple[str, str]] = {
    "stable": ("#2ca02c", "o"),
    "nonfinite": ("#ff7f0e", "o"),
    "pruned: tie": ("#d62728", "X"),
    "pruned: nonfinite": ("#9467bd", "X"),
    "pruned: grad_explosion": ("#8c564b", "X"),
    "pruned: median": ("#7f7f7f", "v"),
    "pruned: stopped": ("#e377c2", "v"),
    "failed": ("#000000", "s"),
    "running": ("#17becf", "D"),
}
MAX_PANELS = 6
JITTER = 0.12  # spread of points on a categorical axis (fraction of the distance between choices)


def _axis_values(spec: Mapping[str, Any], values: Sequence[Any], numbers: Sequence[int]) -> list[float]:
    if spec.get("type") == "categorical":
        index = {repr(c): i for i, c in enumerate(spec["choices"])}
        # deterministic jitter from the trial number, so overlapping trials stay visible and plots reproduce
        return [index.get(repr(v), math.nan) + JITTER * (((n * 7) % 5) - 2) / 2 for v, n in zip(values, numbers)]
    return [float(v) if v is not None else math.nan for v in values]


def _style_axis(ax, spec: Mapping[str, Any], key: str, which: str) -> None:
    set_label, set_scale = (ax.set_xlabel, ax.set_xscale) if which == "x" else (ax.set_ylabel, ax.set_yscale)
    set_label(key, fontsize=8)
    if spec.get("type") == "categorical":
        ticks = list(range(len(spec["choices"])))
        (ax.set_xticks if which == "x" else ax.set_yticks)(ticks, [str(c) for c in spec["choices"]], fontsize=7)
        (ax.set_xlim if which == "x" else ax.set_ylim)(-0.5, len(ticks) - 0.5)
    elif spec.get("log"):
        set_scale("log")
    ax.tick_params(which="both", labelsize=7)


def _pairs(keys: Sequence[str]) -> list[tuple[str, str | None]]:
    if len(keys) == 1:
        return [(keys[0], None)]
    return list(itertools.combinations(keys, 2))[:MAX_PANELS]


def plot_stability_map(trials: Sequence[Mapping[str, Any]], space: Mapping[str, Mapping[str, Any]]) -> Figure:
    """``trials``: dicts with ``number``, ``params`` (key -> value) and ``outcome`` (a key of OUTCOME_STYLES);
    ``space``: key -> spec (type, low, high, log, choices) as stored with the study."""
    keys = list(space)
    pairs = _pairs(keys)
    cols = min(len(pairs), 3)
    rows = math.ceil(len(pairs) / cols)
    fig = new_figure(height=2.8 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    numbers = [t["number"] for t in trials]
    seen: set[str] = set()
    for ax, (kx, ky) in zip(axes, pairs):
        xs = _axis_values(space[kx], [t["params"].get(kx) for t in trials], numbers)
        ys = (_axis_values(space[ky], [t["params"].get(ky) for t in trials], numbers) if ky
              else [JITTER * (((n * 7) % 5) - 2) for n in numbers])
        for x, y, t in zip(xs, ys, trials):
            color, marker = OUTCOME_STYLES.get(t["outcome"], ("#bcbd22", "o"))
            ax.scatter([x], [y], c=color, marker=marker, s=42, edgecolors="white", linewidths=0.5)
            ax.annotate(str(t["number"]), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6)
            seen.add(t["outcome"])
        _style_axis(ax, space[kx], kx, "x")
        if ky:
            _style_axis(ax, space[ky], ky, "y")
        else:
            ax.set_yticks([])
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=OUTCOME_STYLES[o][0], marker=OUTCOME_STYLES[o][1], linestyle="", label=o)
               for o in OUTCOME_STYLES if o in seen]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=LEGEND_FONT,
               frameon=False)
    fig.suptitle("Stability map: trials by parameter pair (number = trial)", fontsize=9)
    return fig
