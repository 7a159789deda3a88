"""Report figures: one function per figure, each returns a matplotlib Figure (Agg canvas, no pyplot).

Every function takes either one run's step table (`Trace.steps`) or a mapping label -> step table to
overlay several runs (runs differ by line style, matrices by colour). Non-finite steps are marked with
red vertical lines. Sized for GitHub's column: 8 in wide at 100 dpi.
"""

from __future__ import annotations

import math
from typing import Mapping

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, LogFormatterSciNotation, NullFormatter

from ris_stability.records import GRAD_NONFINITE_PREFIX, GRAD_TOTAL, grad_modules, loss_terms, matrix_stats
from ris_stability.report.canvas import (DPI, HEIGHT_IN, LEGEND_FONT, MIN_COLOR_DECADES, NONFINITE_COLOR,
                                         RUN_STYLES, SKIPPED_COLOR, TERM_COLORS, WIDTH_IN, StepTables, _layer,
                                         _legend, _mark_bad_steps, _matrices, _name_handles, _no_data,
                                         _plot_series, _runs, _style_axes, new_figure, palette, save_figure,
                                         short_label)
from ris_stability.report.derive import log10_cond_filled

__all__ = ["DPI", "HEIGHT_IN", "NONFINITE_COLOR", "RUN_STYLES", "SKIPPED_COLOR", "WIDTH_IN", "new_figure",
           "palette", "plot_gaps", "plot_grad_heatmap", "plot_log10_cond", "plot_loss_terms", "plot_rank",
           "save_figure", "short_label"]


def plot_rank(steps: StepTables, colors: Mapping[str, tuple] | None = None) -> Figure:
    """Numerical rank of each watched matrix over steps; the matrix size n as a thin dotted line."""
    runs = _runs(steps)
    names = _matrices(runs)
    colors = colors or palette(names)
    fig = new_figure()
    ax = fig.add_subplot()
    for i, ((_, frame), style) in enumerate(zip(runs, RUN_STYLES)):
        for name in names:
            stats = matrix_stats(frame, name)
            if "rank" in stats:
                _plot_series(ax, stats["rank"], colors[name], style, drawstyle="steps-post",
                             **_layer(names.index(name), len(names)))
            if "n" in stats and i == 0:
                size = stats["n"].dropna()
                ax.plot(size.index, size.to_numpy(), color=colors[name], ls=(0, (1, 3)), lw=0.9, alpha=0.7)
    if not names:
        _no_data(ax, "matrix statistics")
    _style_axes(ax, "numerical rank\n(eigenvalues above tol)",
                "Numerical rank per matrix (thin dotted: matrix size n)")
    _legend(fig, _name_handles(names, colors, runs) + _mark_bad_steps(ax, runs))
    return fig


def plot_log10_cond(steps: StepTables, colors: Mapping[str, tuple] | None = None, eps: float | None = None,
                    precision: str = "") -> Figure:
    """log10 condition number over steps; singular steps (cond = inf) as triangles on a top band;
    with `eps`, a dashed line at log10(1/eps) where inverses lose every digit."""
    runs = _runs(steps)
    names = _matrices(runs)
    colors = colors or palette(names)
    fig = new_figure()
    ax = fig.add_subplot()
    conds = {(label, n): log10_cond_filled(matrix_stats(frame, n)) for label, frame in runs for n in names}
    finite = [v for s in conds.values() for v in s[np.isfinite(s)]]
    # The singular band sits above every finite value and above the 1/eps line.
    top = max(finite + ([-math.log10(eps)] if eps is not None else []) + [0.0]) + 1.0
    handles = _name_handles(names, colors, runs)
    ranged = _range_separation(runs, names, conds)
    if runs:  # both what is drawn for a matrix: its condition number and, singular, its range separation
        first = runs[0][0]
        _say_hidden(handles, names, {n: pd.concat([conds[(first, n)], ranged.get((first, n), pd.Series())])
                                     for n in names})
    rows = len(runs) * len(names)
    for r, ((label, _), style) in enumerate(zip(runs, RUN_STYLES)):
        for i, name in enumerate(names):
            values = conds[(label, name)]
            _plot_series(ax, values, colors[name], style, **_layer(i, len(names)))
            singular = values.index[np.isinf(values)]
            row = top + INF_ROW * (r * len(names) + i)  # one row per matrix: markers never hide each other
            ax.plot(singular, np.full(len(singular), row), ls="none", marker="^", ms=5, color=colors[name],
                    clip_on=False)
    for (label, name), values in ranged.items():
        style = dict(zip((lb for lb, _ in runs), RUN_STYLES))[label]
        _plot_series(ax, values, colors[name], style, lw=1.0, marker="|", ms=4)
    if ranged:
        how = ("lambda_max / smallest eigenvalue\nabove the rank tolerance" if all(
            "range_log10_cond" in matrix_stats(frame, name) for label, frame in runs for lb, name in ranged
            if lb == label) else "lambda_max / gap at the\nsignal/noise boundary")
        handles.append(Line2D([], [], color="grey", lw=1.0, marker="|",
                              label=f"singular: log10 cond of its range\n({how})"))
    if any(np.isinf(s).any() for s in conds.values()):
        ax.axhline(top - INF_ROW, color="grey", lw=0.6, ls=":")
        _inf_tick(ax, top, INF_ROW * max(rows - 1, 0))
        handles.append(Line2D([], [], ls="none", marker="^", color="grey", label="cond = inf (singular):\n"
                                                                                    "top band, one row per matrix"))
    if eps is not None:
        ax.axhline(-math.log10(eps), color="black", lw=0.8, ls="--")
        handles.append(Line2D([], [], color="black", lw=0.8, ls="--", label=f"log10(1/eps) {precision}".strip()))
    if not names:
        _no_data(ax, "matrix statistics")
    _style_axes(ax, "log10 condition number\n(lambda_max / lambda_min)", "Condition number per matrix")
    _legend(fig, handles + _mark_bad_steps(ax, runs))
    return fig


def _range_separation(runs, names, conds) -> dict[tuple[str, str], pd.Series]:
    """For a matrix singular at most of its steps (rank-deficient by design, e.g. a covariance of fewer
    snapshots than its size), where cond = inf says nothing: the log10 condition number of its numerical
    range (lambda_max / smallest eigenvalue above the rank tolerance) at the steps where it was singular.
    Traces without that statistic fall back to log10(lambda_max / gap at the signal/noise boundary)."""
    out = {}
    for label, frame in runs:
        for name in names:
            values = conds[(label, name)]
            stats = matrix_stats(frame, name)
            singular = np.isinf(values)
            if singular.sum() * 2 <= values.notna().sum():
                continue
            if "range_log10_cond" in stats:
                ratio = stats["range_log10_cond"].where(singular)
            elif {"lambda_max", "gap_split"} <= set(stats):
                gap = stats["gap_split"].where(stats["gap_split"] > 0)
                ratio = np.log10(stats["lambda_max"].abs() / gap).where(singular)
            else:
                continue
            if ratio.notna().any():
                out[(label, name)] = ratio
    return out


def _say_hidden(handles: list, names: list[str], series: Mapping[str, pd.Series | None]) -> None:
    """A matrix whose series equals an earlier one's (e.g. eigvalsh and eigh of the same matrix) is drawn
    over it: its legend entry says so, instead of leaving the reader to wonder where the other went."""
    for i, name in enumerate(names):
        s = series.get(name)
        if s is None or not s.notna().any():
            continue
        twin = next((other for other in names[:i] if series.get(other) is not None
                     and series[other].equals(s)), None)
        if twin is not None and i < len(handles):
            handles[i].set_label(f"{handles[i].get_label()}\n  (same values as {short_label(twin)}: one line)")


INF_ROW = 0.35  # height of one row of the singular (cond = inf) band, in decades of the condition number


def _inf_tick(ax, top: float, band: float = 0.0) -> None:
    """Label the singular band [top, top + band] "inf" on the y axis, dropping numeric ticks that would
    crowd it."""
    low = ax.get_ylim()[0]
    ax.set_ylim(low, top + band + 0.5)
    auto = list(ax.get_yticks())
    spacing = auto[1] - auto[0] if len(auto) > 1 else 1.0
    ticks = [t for t in auto if low <= t <= top - 0.75 * spacing]
    ax.set_yticks(ticks + [top + band / 2], [f"{t:g}" for t in ticks] + ["inf"])


GAP_PANELS = (
    ("gap_split", None, r"Signal/noise gap $\lambda_K - \lambda_{K+1}$"),
    ("min_gap_noise", "min_gap", "Smallest gap inside the noise subspace (all pairs where K is unknown)"),
)


def _gap_series(stats: pd.DataFrame, column: str, fallback: str | None) -> pd.Series | None:
    if column in stats:
        return stats[column]
    if fallback and fallback in stats:
        return stats[fallback]
    return None


ZERO_BAND_DECADES = 0.4  # height of one row of the "gap = 0" band, in decades of the log axis


def _ticks_above(ax, floor: float, top: float) -> None:
    """Log ticks only from the floor up (the zero band's rows are positions, not values); 2x and 5x
    ticks are labelled too when fewer than two decades are visible."""
    lo, hi = round(math.log10(floor)), math.ceil(math.log10(top))
    step = max(1, (hi - lo) // 6)
    mantissas = (1, 2, 5) if math.log10(top / floor) < 2 else (1,)
    major = [m * 10.0 ** e for e in range(lo, hi + 1, step) for m in mantissas]
    minor = [m * 10.0 ** e for e in range(lo, hi) for m in range(2, 10) if m not in mantissas] if step == 1 else []
    ax.yaxis.set_major_locator(FixedLocator([t for t in major if t <= top]))
    ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    ax.yaxis.set_minor_locator(FixedLocator(minor))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_gaps(steps: StepTables, colors: Mapping[str, tuple] | None = None) -> Figure:
    """Eigenvalue gaps on a log axis: the signal/noise split and the smallest noise gap. A zero gap
    (an exact tie, 0/0 in eigh backward) cannot sit on a log axis: it is drawn in a shaded band below
    the axis floor, one row per matrix (and run), labelled 0."""
    runs = _runs(steps)
    names = _matrices(runs)
    colors = colors or palette(names)
    series = {(p, label, n): _gap_series(matrix_stats(frame, n), col, fb)
              for p, (col, fb, _) in enumerate(GAP_PANELS) for label, frame in runs for n in names}
    positive = [v for s in series.values() if s is not None for v in s[np.isfinite(s) & (s > 0)]]
    floor = 10.0 ** (math.floor(math.log10(min(positive)))) if positive else 1e-12
    rows = len(runs) * len(names)
    fig = new_figure(height=5.0)
    axes = fig.subplots(2, 1, sharex=True)
    for p, (ax, (_, _, title)) in enumerate(zip(axes, GAP_PANELS)):
        any_zero = False
        for r, ((label, _), style) in enumerate(zip(runs, RUN_STYLES)):
            for i, name in enumerate(names):
                s = series[(p, label, name)]
                if s is None:
                    continue
                _plot_series(ax, s.where(s > 0), colors[name], style, **_layer(i, len(names)))
                zeros = s.index[s == 0]
                any_zero |= len(zeros) > 0
                row = floor / 10.0 ** (ZERO_BAND_DECADES * (r * len(names) + i + 1))
                ax.plot(zeros, np.full(len(zeros), row), ls="none", marker="v", ms=5, color=colors[name])
        ax.set_yscale("log")
        if any_zero:
            bottom = floor / 10.0 ** (ZERO_BAND_DECADES * (rows + 1))
            ax.axhspan(bottom, floor, color="#f2dede", zorder=0)
            ax.text(-0.01, math.sqrt(bottom * floor), "0", transform=ax.get_yaxis_transform(),
                    ha="right", va="center", fontsize=9, color="#a94442")
            top = ax.get_ylim()[1] if positive else floor * 10
            ax.set_ylim(bottom, top)
            _ticks_above(ax, floor, top)
        if all(series[(p, label, n)] is None for label, _ in runs for n in names):
            _no_data(ax, "gap of this kind")
        _style_axes(ax, "eigenvalue gap\n(matrix units)", title)
    handles = _name_handles(names, colors, runs)
    if runs:
        _say_hidden(handles, names, {n: pd.concat([s for p in range(len(GAP_PANELS))
                                                   if (s := series[(p, runs[0][0], n)]) is not None] or [pd.Series()])
                                     for n in names})
    if any(s is not None and (s == 0).any() for s in series.values()):
        handles.append(Patch(color="#f2dede", label="gap = 0 (exact tie):\nshaded band, one row\nper matrix"))
    _legend(fig, handles + _mark_bad_steps(axes[0], runs))
    _mark_bad_steps(axes[1], runs)
    return fig


def _grad_matrix(frame: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(row labels, norms [module, step], non-finite mask) for one run."""
    modules = grad_modules(frame.columns)
    columns = [f"grad/{m}" for m in modules] + ([GRAD_TOTAL] if GRAD_TOTAL in frame else [])
    labels = modules + (["(total)"] if GRAD_TOTAL in frame else [])
    z = frame[columns].to_numpy(dtype=float).T if columns else np.zeros((0, len(frame)))
    bad_step = frame["nonfinite"].to_numpy(bool) if "nonfinite" in frame else np.zeros(len(frame), bool)
    nonfinite = np.isinf(z) | (np.isnan(z) & bad_step[None, :])
    for row, module in enumerate(modules):
        counts = frame.get(f"{GRAD_NONFINITE_PREFIX}{module}")
        if counts is not None:
            nonfinite[row] |= counts.fillna(0).to_numpy() > 0
    return labels, z, nonfinite


def _edges(steps: np.ndarray) -> np.ndarray:
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2.0
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def plot_grad_heatmap(steps: StepTables, spikes: Mapping[int, list[str]] | None = None,
                      explosions: Mapping[int, list[str]] | None = None) -> Figure:
    """Per-module gradient L2 norm, module x step, log colour scale; one panel per run when overlaying.
    Black: exactly 0 (no gradient); red: non-finite; light grey: not logged. ``spikes`` (one run only):
    step -> names of the modules that jumped at a gradient spike, ringed on their cells (the total row
    is ringed at every spike); ``explosions`` likewise, framed by squares (docs/explosions.md)."""
    runs = _runs(steps)
    data = [(label, *_grad_matrix(frame), frame.index.to_numpy(dtype=float)) for label, frame in runs]
    positive = np.concatenate([z[np.isfinite(z) & (z > 0)] for _, _, z, _, _ in data] + [np.zeros(0)])
    vmin, vmax = (positive.min(), positive.max()) if len(positive) else (1e-12, 1.0)
    if vmax < vmin * 10 ** MIN_COLOR_DECADES:  # a narrow range would crowd the colour bar with labels
        centre, half = math.sqrt(vmin * vmax), 10 ** (MIN_COLOR_DECADES / 2)
        vmin, vmax = centre / half, centre * half
    norm = LogNorm(vmin=vmin, vmax=vmax)
    cmap = matplotlib.colormaps["viridis"].with_extremes(under="black", bad="#d9d9d9")
    rows = max(len(labels) for _, labels, _, _, _ in data)
    fig = new_figure(height=min(9.0, max(2.6, 1.1 + len(runs) * (0.5 + 0.22 * rows))))
    axes = np.atleast_1d(fig.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0])
    mesh = None
    for ax, (label, labels, z, nonfinite, x) in zip(axes, data):
        if not labels:
            _no_data(ax, "gradient norms")
            _style_axes(ax, "module", f"Gradient norm per module {label}".strip())
            continue
        shown = np.where(z == 0, vmin / 10, z)  # below vmin -> the colormap's "under" colour (black)
        y = np.arange(len(labels) + 1) - 0.5
        mesh = ax.pcolormesh(_edges(x), y, np.ma.masked_invalid(shown), cmap=cmap, norm=norm)
        red = np.ma.masked_where(~nonfinite, np.ones_like(z))
        ax.pcolormesh(_edges(x), y, red, cmap=ListedColormap([NONFINITE_COLOR]), vmin=0, vmax=1)
        if spikes and len(runs) == 1:
            _ring_spikes(ax, labels, spikes)
        if explosions and len(runs) == 1:
            _ring_spikes(ax, labels, explosions, marker="s", color=EXPLOSION_COLOR)
        ax.set_yticks(range(len(labels)), labels, fontsize=LEGEND_FONT)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        _style_axes(ax, "module", f"Gradient L2 norm per module{' — run: ' + label if label else ''}")
        ax.grid(False)
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes), extend="min", label="grad L2 norm (log scale)", shrink=0.9)
    keys = [Patch(color="black", label="0 (no gradient)"), Patch(color=NONFINITE_COLOR, label="non-finite"),
            Patch(color="#d9d9d9", label="not logged")]
    if spikes and len(runs) == 1:
        keys.append(Line2D([], [], marker="o", linestyle="none", markerfacecolor="none",
                           markeredgecolor=SPIKE_COLOR, markeredgewidth=1.5, label="gradient spike"))
    if explosions and len(runs) == 1:
        keys.append(Line2D([], [], marker="s", linestyle="none", markerfacecolor="none",
                           markeredgecolor=EXPLOSION_COLOR, markeredgewidth=1.5, label="gradient explosion"))
    fig.legend(handles=keys, loc="outside lower center", ncol=len(keys), fontsize=LEGEND_FONT, frameon=False)
    return fig


SPIKE_COLOR = "#ff7f0e"
EXPLOSION_COLOR = "#e377c2"  # not the non-finite red: an explosion is finite


def _ring_spikes(ax, labels: list[str], spikes: Mapping[int, list[str]], marker: str = "o",
                 color: str = SPIKE_COLOR) -> None:
    rows = {label: i for i, label in enumerate(labels)}
    points = [(step, rows[name]) for step, names in spikes.items()
              for name in list(names) + ["(total)"] if name in rows]
    if points:
        x, y = zip(*points)
        ax.scatter(x, y, s=90, marker=marker, facecolors="none", edgecolors=color, linewidths=1.5, zorder=5)


def _zero_suffix(label: str, zero_runs: list[str], n_runs: int) -> str:
    if not zero_runs:
        return ""
    where = "" if n_runs == 1 else " in all runs" if len(zero_runs) == n_runs else f" in {', '.join(zero_runs)}"
    return f" (≡ 0{where}, not drawn)"


TREND_MIN_POINTS = 30  # below this the raw curve is the trend


def _trend_window(n: int) -> int:
    """Rolling-mean window of a curve of n points: about a twentieth of it, at least 5 steps."""
    return max(5, n // 20)


def plot_loss_terms(steps: StepTables) -> Figure:
    """Total loss and each term over steps; log y when every drawn value is positive and they span more
    than a decade. A curve of TREND_MIN_POINTS or more points is drawn faint (raw, one point per step) under
    its rolling mean (the trend, full colour). A series that is
    identically 0 in a run is not drawn (the legend says so), so it does not force a linear axis."""
    runs = _runs(steps)
    terms = list(dict.fromkeys(t for _, frame in runs for t in loss_terms(frame.columns)))
    colors = palette(terms, TERM_COLORS)
    columns = [("loss", "total", "black")] + [(f"loss/{t}", t, colors[t]) for t in terms]
    drawn, zero_runs = [], {label: [] for _, label, _ in columns}
    for (run, frame), style in zip(runs, RUN_STYLES):
        for col, label, color in columns:
            if col not in frame:
                continue
            finite = frame[col][np.isfinite(frame[col])]
            if len(finite) and (finite == 0).all():
                zero_runs[label].append(run)
            else:
                drawn.append((frame[col], color, style, col == "loss"))
    values = np.concatenate([s[np.isfinite(s)].to_numpy(float) for s, _, _, _ in drawn] + [np.zeros(0)])
    # Log only when it helps: all positive and spread over more than a decade.
    log = len(values) > 0 and bool((values > 0).all()) and values.max() > 10 * values.min()
    fig = new_figure()
    ax = fig.add_subplot()
    windows = []
    for series, color, style, total in drawn:
        clean = series[np.isfinite(series)]
        if len(clean) < TREND_MIN_POINTS:
            _plot_series(ax, series, color, style, **({"lw": 2.0} if total else {}))
            continue
        window = _trend_window(len(clean))
        windows.append(window)
        _plot_series(ax, series, color, style, lw=0.7, alpha=0.25, marker=None)
        trend = clean.rolling(window, center=True, min_periods=max(1, window // 2)).mean()
        _plot_series(ax, trend, color, style, lw=2.2 if total else 1.5, marker=None)
    if log:
        ax.set_yscale("log")
    handles = [Line2D([], [], color=color, lw=2.0 if c == "loss" else 1.5,
                      label=label + _zero_suffix(label, zero_runs[label], len(runs)))
               for c, label, color in columns if any(c in f for _, f in runs)]
    if len(runs) > 1:
        handles += [Line2D([], [], color="black", ls=style, label=f"run: {label}")
                    for (label, _), style in zip(runs, RUN_STYLES)]
    if windows:
        handles.append(Line2D([], [], color="grey", lw=0.7, alpha=0.4,
                              label=f"faint: every step; bold: mean\nover {max(windows)} steps"))
    if not values.size:
        _no_data(ax, "finite non-zero loss values")
    _style_axes(ax, "loss value" + (" (log scale)" if log else ""), "Loss terms")
    _legend(fig, handles + _mark_bad_steps(ax, runs))
    return fig
