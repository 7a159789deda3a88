"""NaN, +inf and -inf stay apart from the trace to the report: a singular matrix (cond = inf) is drawn on
the singular band, a matrix whose statistics are NaN (it held NaN itself) is not, and an exact tie's
infinite amplification reads back as inf, not as "not recorded"."""

from __future__ import annotations

import math

import numpy as np

from ris_stability.records import TraceWriter, matrix_stats, read_trace
from ris_stability.report import build_report, plots
from ris_stability.report.derive import log10_cond_filled, summarize_matrix
from tests.ris_stability.trace_factory import DEFAULT_META

NAN = math.nan
STATS = ("rank", "cond", "log10_cond", "lambda_min", "lambda_max", "min_gap", "max_cluster", "cluster_value",
         "amplification")


def matrix(name: str, values: dict) -> dict:
    return {f"mat/{name}/{k}": v for k, v in values.items()}


def healthy(step: int) -> dict:
    return {"n": 4, "rank": 4, "cond": 10.0 + step, "log10_cond": math.log10(10.0 + step), "lambda_min": 0.1,
            "lambda_max": 1.0 + 0.1 * step, "min_gap": 0.2, "max_cluster": 1, "cluster_value": 1.0,
            "amplification": 5.0}


def write_run(run_dir):
    """Steps 0-5: "poisoned" is recorded with NaN statistics at steps 2-3; "singular" has cond = inf at
    steps 1-2 and an exact tie (amplification inf) at step 4."""
    with TraceWriter(run_dir, DEFAULT_META) as w:
        for step in range(6):
            bad = step in (2, 3)
            row = {"step": step, "loss": NAN if bad else 1.0 / (step + 1), "nonfinite": bad, "skipped": bad}
            row.update(matrix("poisoned", {"n": 4, **dict.fromkeys(STATS, NAN)} if bad else healthy(step)))
            sing = healthy(step)
            if step in (1, 2):
                sing.update(rank=3, cond=math.inf, log10_cond=math.inf, lambda_min=0.0)
            if step == 4:
                sing.update(min_gap=0.0, max_cluster=2, cluster_value=0.5, amplification=math.inf)
            row.update(matrix("singular", sing))
            w.step(row)
    return run_dir


def test_nan_statistics_are_not_singular_and_inf_is_kept(tmp_path):
    trace = read_trace(write_run(tmp_path / "run"))
    poisoned, singular = matrix_stats(trace.steps, "poisoned"), matrix_stats(trace.steps, "singular")
    cond_p, cond_s = log10_cond_filled(poisoned), log10_cond_filled(singular)
    assert cond_p[[2, 3]].isna().all() and np.isfinite(cond_p.drop([2, 3])).all()
    assert list(cond_s.index[np.isinf(cond_s)]) == [1, 2]
    assert singular.loc[4, "amplification"] == math.inf and singular.loc[4, "min_gap"] == 0.0
    p, s = summarize_matrix(trace, "poisoned"), summarize_matrix(trace, "singular")
    assert (p.singular_steps, p.nan_steps) == (0, (2, 3))
    assert (s.singular_steps, s.nan_steps) == (2, ())


def test_legacy_null_cond_is_singular_only_with_a_finite_rank_below_n(tmp_path):
    """Old traces wrote inf as null: null with rank < n was a singular matrix, null with NaN rank was NaN."""
    with TraceWriter(tmp_path / "run", DEFAULT_META) as w:
        w.step({"step": 0, **matrix("old", {"n": 4, "rank": 3, "log10_cond": None, "lambda_max": 1.0})})
        w.step({"step": 1, **matrix("old", {"n": 4, "rank": None, "log10_cond": None, "lambda_max": None})})
        w.step({"step": 2, **matrix("old", {"n": 4, "rank": 4, "log10_cond": 1.0, "lambda_max": 1.0})})
    cond = log10_cond_filled(matrix_stats(read_trace(tmp_path / "run").steps, "old"))
    assert cond[0] == math.inf and math.isnan(cond[1]) and cond[2] == 1.0


def singular_band_steps(fig) -> dict[str, list[float]]:
    """x positions of the triangles drawn on the singular band, by colour."""
    ax = fig.axes[0]
    return {str(line.get_color()): list(line.get_xdata()) for line in ax.lines
            if line.get_marker() == "^" and len(line.get_xdata())}


def test_condition_figure_draws_only_the_singular_matrix_on_the_band(tmp_path):
    trace = read_trace(write_run(tmp_path / "run"))
    colors = plots.palette(trace.matrices)
    drawn = singular_band_steps(plots.plot_log10_cond(trace.steps, colors))
    assert drawn == {str(colors["singular"]): [1, 2]}


def test_report_names_the_nan_statistics(tmp_path):
    run = write_run(tmp_path / "run")
    text = build_report(run).read_text()
    assert "Statistics are NaN" in text and "`poisoned` at steps 2–3" in text
