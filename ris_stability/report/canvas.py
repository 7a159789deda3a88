"""Shared canvas of the report figures: size, colours, run line styles, legends, bad-step marks.

A figure takes one run's step table or a mapping label -> step table (runs differ by line style,
matrices by colour); ``_runs`` normalises both. Red means non-finite in every figure, grey skipped.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Mapping

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import ScalarFormatter
from PIL import Image

from ris_stability.records import matrix_names
from ris_stability.records.atomic import atomic_path

WIDTH_IN, HEIGHT_IN, DPI = 8.0, 3.5, 100
RUN_STYLES = ("-", "--", ":", "-.")
NONFINITE_COLOR = "#d62728"
SKIPPED_COLOR = "#7f7f7f"
# Matrix colours: tab10 without its red (red means "non-finite" in every figure), then Dark2.
MATRIX_COLORS = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 3] + list(
    matplotlib.colormaps["Dark2"].colors)
TERM_COLORS = list(matplotlib.colormaps["Set1"].colors[1:]) + list(matplotlib.colormaps["Dark2"].colors)
MARKERS_MAX_POINTS = 60  # draw point markers when a series is short enough for them to stay readable
LEGEND_FONT = 7
MIN_COLOR_DECADES = 2.0  # the grad-norm colour scale spans at least this many decades
LEGEND_CHARS = 32  # longer names are shortened in legends (tables keep them whole)
PNG_COLORS = 256

StepTables = pd.DataFrame | Mapping[str, pd.DataFrame]


def _runs(steps: StepTables) -> list[tuple[str, pd.DataFrame]]:
    if isinstance(steps, pd.DataFrame):
        return [("", steps)]
    runs = list(steps.items())
    if not runs:
        raise ValueError("no step table given to plot")
    if len(runs) > len(RUN_STYLES):
        raise ValueError(f"at most {len(RUN_STYLES)} runs can be overlaid, got {len(runs)}")
    return runs


def palette(names: Iterable[str], colors: list = MATRIX_COLORS) -> dict[str, tuple]:
    """Stable colour per name: sorted names take colours in order, so every figure of a report (and
    every run of a comparison, given the union of names) draws a name in the same colour."""
    return {name: colors[i % len(colors)] for i, name in enumerate(sorted(set(names)))}


def new_figure(height: float = HEIGHT_IN) -> Figure:
    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Palette PNG at the report DPI, without metadata, so regenerated files only differ when pixels do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    # A 256-colour palette keeps plots visually identical at about a third of the RGBA size.
    with Image.open(buffer) as image:
        with atomic_path(path) as tmp:  # never half a PNG in the folder
            image.convert("RGB").quantize(colors=PNG_COLORS, method=Image.Quantize.MEDIANCUT).save(
                tmp, format="PNG", optimize=True)
    return path


def _flag_steps(frame: pd.DataFrame, column: str) -> list[int]:
    return [int(s) for s in frame.index[frame[column].astype(bool)]] if column in frame else []


def _mark_bad_steps(ax, runs: list[tuple[str, pd.DataFrame]]) -> list[Line2D]:
    """Vertical lines at non-finite (red) and skipped-but-finite (grey) steps; returns legend handles."""
    handles = []
    for (_, frame), style in zip(runs, RUN_STYLES):
        bad = _flag_steps(frame, "nonfinite")
        for s in bad:
            ax.axvline(s, color=NONFINITE_COLOR, lw=1.0, ls=style, alpha=0.8, zorder=1)
        for s in set(_flag_steps(frame, "skipped")) - set(bad):
            ax.axvline(s, color=SKIPPED_COLOR, lw=1.0, ls=style, alpha=0.8, zorder=1)
    if any(_flag_steps(f, "nonfinite") for _, f in runs):
        handles.append(Line2D([], [], color=NONFINITE_COLOR, lw=1.0, label="non-finite step"))
    if any(set(_flag_steps(f, "skipped")) - set(_flag_steps(f, "nonfinite")) for _, f in runs):
        handles.append(Line2D([], [], color=SKIPPED_COLOR, lw=1.0, label="skipped step"))
    return handles


def _plot_series(ax, series: pd.Series, color, style: str, **kwargs) -> None:
    s = series.dropna()
    s = s[np.isfinite(s)]
    if not len(s):
        return
    style_kwargs = {"marker": "o", "ms": 2.5, "lw": 1.3}
    style_kwargs.update(kwargs)
    if len(s) > MARKERS_MAX_POINTS:
        style_kwargs["marker"] = None
    ax.plot(s.index, s.to_numpy(), color=color, ls=style, **style_kwargs)


MATRIX_MARKERS = ("o", "s", "^", "D", "P", "X", "*", "h")


def _layer(i: int, k: int) -> dict:
    """Line width / marker for the i-th of k series: earlier series are drawn wider, so a series that
    coincides with a later one (a matrix watched by name and probed at its eigh call) stays visible."""
    return {"lw": min(1.2 + 0.8 * (k - 1 - i), 4.0), "ms": min(2.5 + 1.2 * (k - 1 - i), 7.0),
            "marker": MATRIX_MARKERS[i % len(MATRIX_MARKERS)]}


def short_label(name: str, limit: int = LEGEND_CHARS) -> str:
    """A legend label of at most `limit` characters: long call-site names keep their head and tail."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[-(limit - 1 - head):]}"


def _name_handles(names: Iterable[str], colors: Mapping[str, tuple], runs) -> list[Line2D]:
    names = list(names)
    handles = [Line2D([], [], color=colors[n], lw=1.5, marker=_layer(i, len(names))["marker"], ms=4,
                      label=short_label(n)) for i, n in enumerate(names)]
    if len(runs) > 1:
        handles += [Line2D([], [], color="black", ls=style, lw=1.2, label=f"run: {label}")
                    for (label, _), style in zip(runs, RUN_STYLES)]
    return handles


def _legend(fig: Figure, handles: list) -> None:
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=LEGEND_FONT, frameon=False)


def _style_axes(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(True, alpha=0.3, lw=0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    formatter = ax.yaxis.get_major_formatter()
    if isinstance(formatter, ScalarFormatter):  # an offset label ("1e-8+1.2e-2") would collide with the title
        formatter.set_useOffset(False)


def _matrices(runs) -> list[str]:
    return sorted({n for _, frame in runs for n in matrix_names(frame.columns)})


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", transform=ax.transAxes, ha="center", va="center", color="grey")


