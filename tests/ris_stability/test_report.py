import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.records import TraceError, TraceWriter, UsageError, read_trace, write_finding
from ris_stability.report import ReportError, build_comparison, build_report, plots
from ris_stability.report import markdown as md
from ris_stability.report.build import _resolve_out
from ris_stability.report.derive import log10_cond_filled, precision, summarize_matrix
from ris_stability.report.look import what_to_look_at
from tests.ris_stability.trace_factory import (
    DEFAULT_META, make_run, make_seed_nan_like, set_meta, truncate_trace,
)

IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


def assert_links_resolve(report: Path) -> list[str]:
    links = IMAGE_LINK.findall(report.read_text())
    assert links, f"{report} has no image"
    for link in links:
        assert not link.startswith("/") and ":" not in link and "\\" not in link, link
        target = report.parent / link
        assert target.is_file() and target.stat().st_size > 1000, link
        with Image.open(target) as image:
            assert image.size[0] >= 700  # GitHub width: 8 in at 100 dpi
    return links


@pytest.fixture(scope="module")
def seed_nan_report(tmp_path_factory):
    run = make_seed_nan_like(tmp_path_factory.mktemp("runs") / "seed-nan")
    write_finding(run, {"step": 3, "phase": "backward", "node": "LinalgEighBackward0", "module": "loss.subspace",
                        "location": "ris_model/loss.py:88", "cause": "0/0 in eigh backward (cluster of 118)",
                        "inputs": [{"shape": [8, 144, 144], "max_cluster": 118}]})
    return run, build_report(run)


def test_report_from_synthetic_trace(seed_nan_report):
    run, report = seed_nan_report
    assert report == run / "report.md"
    text = report.read_text()
    for section in ("## Run summary", "## What to look at", "## Watched matrices", "## Gradient norms per module",
                    "## Loss terms", "## Events", "## Bisector finding"):
        assert section in text
    links = assert_links_resolve(report)
    assert sorted(Path(link).name for link in links) == sorted(
        ["rank.png", "cond.png", "gaps.png", "grad_heatmap.png", "loss.png"])
    assert "`configs/synthetic.toml` (sha256 `0123456789ab`)" in text
    assert "| **wall time** | 5.0 s |" in text


def test_seed_nan_report_names_nonfinite_step_and_tied_cluster(seed_nan_report):
    _, report = seed_nan_report
    text = report.read_text()
    look = text.split("## What to look at")[1].split("## Watched matrices")[0]
    items = [line for line in look.splitlines() if re.match(r"\d+\. ", line)]
    assert items[0].startswith("1. **Non-finite at step 3**")
    assert "`subspace`" in items[0] and "capsules/step_000003.pt" in items[0]
    assert ("Suspect matrix there: `R_blend` (tied cluster of 118 eigenvalues at 1.0e-03, smallest gap 0, eigenvectors "
            "receive gradient)") in items[0]
    tie = next(i for i in items if re.match(r"\d+\. `R_blend`: ", i))
    assert "noise eigenvalues tie from step 0 (cluster of 118 at 1.0e-03" in tie
    assert "0/0" in tie and 'loss.eigh_backward = "gap_aware"' in tie
    assert any("Loss term `orth` is identically 0" in i for i in items)
    assert any("Module `heads.range` never receives gradient" in i for i in items)
    assert any("Bisector finding at step 3" in i and "LinalgEighBackward0" in i for i in items)
    row = next(line for line in text.splitlines() if line.startswith("| `R_blend` |"))
    assert "118 at 1.0e-03 (step 0)" in row and "| yes |" in row and "0 (tied_eigenvalues event; tie, vectors used) |" in row
    assert "| **non-finite steps** | 3 |" in text


def test_report_from_truncated_trace(tmp_path):
    run = make_run(tmp_path / "crashed", n_steps=7, nonfinite_at=(2,))
    truncate_trace(run)
    report = build_report(run)
    text = report.read_text()
    assert "**Incomplete run**" in text and "cut mid-write" in text
    assert "6 (steps 0–5)" in text and "covers 6 logged step(s), steps 0–5; the last line" in text
    assert "**Non-finite at step 2**" in text
    assert_links_resolve(report)


def test_report_to_another_folder(tmp_path):
    run = make_run(tmp_path / "run", n_steps=4)
    out = build_report(run, tmp_path / "elsewhere" / "nested" / "r.md")
    assert out == tmp_path / "elsewhere" / "nested" / "r.md"
    assert_links_resolve(out)
    assert (tmp_path / "elsewhere" / "nested" / "figures" / "gaps.png").is_file()
    assert _resolve_out(run, None) == run / "report.md"
    assert _resolve_out(run, tmp_path / "elsewhere") == tmp_path / "elsewhere" / "report.md"


def test_report_without_matrices_or_grads(tmp_path):
    with TraceWriter(tmp_path / "run", DEFAULT_META) as w:
        for step in range(4):
            w.step({"step": step, "loss": 1.0 / (step + 1)})
    text = build_report(tmp_path / "run").read_text()
    assert "No matrix statistics were recorded" in text and "No per-module values were recorded" in text
    assert IMAGE_LINK.findall(text) == ["figures/loss.png"]


FIGURES = [plots.plot_rank, plots.plot_log10_cond, plots.plot_gaps, plots.plot_grad_heatmap,
           plots.plot_loss_terms]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("two")
    a = read_trace(make_seed_nan_like(base / "a", n_steps=6)).steps
    b = read_trace(make_run(base / "b", n_steps=8, seed=3)).steps
    return a, b


@pytest.mark.parametrize("overlay", [False, True], ids=["one-run", "overlay"])
@pytest.mark.parametrize("figure", FIGURES, ids=lambda f: f.__name__)
def test_figures_return_labelled_figures(two_runs, figure, overlay):
    steps = {"a": two_runs[0], "b": two_runs[1]} if overlay else two_runs[0]
    fig = figure(steps)
    assert isinstance(fig, Figure)
    width, height = fig.get_size_inches()
    assert width == plots.WIDTH_IN and 2.5 <= height <= 9.0
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert panels
    for ax in panels:
        assert ax.get_xlabel() == "training step"
        assert ax.get_ylabel().strip()


def test_nonfinite_steps_are_marked(two_runs):
    fig = plots.plot_loss_terms(two_runs[0])
    red = [line for line in fig.axes[0].lines if line.get_color() == plots.NONFINITE_COLOR]
    assert [line.get_xdata()[0] for line in red] == [3]


def test_matrix_colours_are_consistent_across_figures(two_runs):
    colors = plots.palette(["R_pred", "R_blend", "loss.subspace:linalg.eigh"])
    assert colors == plots.palette(["loss.subspace:linalg.eigh", "R_blend", "R_pred"])
    assert plots.NONFINITE_COLOR not in [matplotlib_hex(c) for c in colors.values()]
    for figure in (plots.plot_rank, plots.plot_log10_cond, plots.plot_gaps):
        legend = figure(two_runs[0], colors).legends[0]
        by_label = {h.get_label(): h.get_color() for h in legend.legend_handles if hasattr(h, "get_color")}
        assert by_label["R_blend"] == colors["R_blend"] and by_label["R_pred"] == colors["R_pred"]


def matplotlib_hex(color) -> str:
    from matplotlib.colors import to_hex

    return to_hex(color)


def test_zero_gaps_drawn_below_the_floor_and_singular_at_top(two_runs):
    steps = two_runs[0]
    fig = plots.plot_gaps(steps)
    noise_ax = fig.axes[1]
    floor = 10.0 ** math.floor(math.log10(steps.filter(like="/min_gap").where(lambda x: x > 0).min().min()))
    zero_markers = [line for line in noise_ax.lines
                    if line.get_marker() == "v" and line.get_linestyle() == "None" and len(line.get_xdata())]
    assert len(zero_markers) == 2  # R_blend (tied noise) and R_pred (min_gap = 0)
    for line in zero_markers:
        assert (np.asarray(line.get_ydata()) < floor).all() and len(line.get_xdata()) == 6
    assert noise_ax.get_ylim()[0] < floor
    cond = plots.plot_log10_cond(steps)
    tops = [line for line in cond.axes[0].lines
            if line.get_marker() == "^" and line.get_linestyle() == "None" and len(line.get_xdata())]
    cond_values = steps.filter(like="/log10_cond").to_numpy()
    finite_max = cond_values[np.isfinite(cond_values)].max()
    assert len(tops) == 1 and (np.asarray(tops[0].get_ydata()) > finite_max).all()


@pytest.mark.parametrize("values, log", [([1.0, 0.5, 0.02], True), ([1.0, -0.5, 0.2], False),
                                         ([0.0121, 0.0122, 0.0123], False)],
                         ids=["positive-log", "negative-linear", "narrow-linear"])
def test_loss_axis_scale(values, log):
    frame = pd.DataFrame({"loss": values, "loss/a": values, "loss/zero": [0.0] * 3}, index=[0, 1, 2])
    fig = plots.plot_loss_terms(frame)
    assert (fig.axes[0].get_yscale() == "log") is log
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "zero (\u2261 0, not drawn)" in labels


def test_heatmap_marks_zero_and_nonfinite_cells(two_runs):
    fig = plots.plot_grad_heatmap(two_runs[0])
    base, overlay = fig.axes[0].collections[:2]
    rows = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert rows == ["encoder", "heads.angle", "heads.range", "heads.k", "(total)"]
    values = np.ma.asarray(base.get_array()).reshape(len(rows), -1)
    assert (values[2] < base.norm.vmin).all()  # heads.range is 0: drawn in the "under" colour
    red = ~np.ma.getmaskarray(np.ma.asarray(overlay.get_array())).reshape(len(rows), -1)
    assert red[:, 3].tolist() == [True, True, False, True, True] and red.sum() == 4


def test_comparison_builds(tmp_path):
    a = make_seed_nan_like(tmp_path / "seed-nan")
    b = make_run(tmp_path / "quickstart", n_steps=10, seed=1)
    build_report(a)
    out = build_comparison([a, b], tmp_path / "cmp", labels=["torch", "gap-aware"])
    assert out == tmp_path / "cmp" / "comparison.md"
    text = out.read_text()
    assert len(assert_links_resolve(out)) == 5
    assert "| non-finite steps | 1 | 0 |" in text and "| first non-finite step | 3 | none |" in text
    assert "| `R_blend` largest tied cluster | 118 | 1 |" in text
    assert "[report](../seed-nan/report.md)" in text
    assert "### `torch`" in text and "### `gap-aware`" in text


@pytest.mark.parametrize("make_call, error, message", [
    pytest.param(lambda p: build_report(p / "missing"), TraceError, "not a run folder", id="report-not-a-run"),
    pytest.param(lambda p: build_report(_with_version(p, 2)), TraceError, "unknown trace schema",
                 id="report-unknown-version"),
    pytest.param(lambda p: build_report(_empty(p)), TraceError, "empty trace", id="report-empty-trace"),
    pytest.param(lambda p: build_report(make_run(p / "r", n_steps=2), _blocked(p) / "x" / "r.md"), ReportError,
                 "cannot create the report folder", id="report-unwritable-out"),
    pytest.param(lambda p: build_comparison([make_run(p / "r", n_steps=2)], p / "c"), ReportError,
                 "needs 2 to 4", id="compare-one-run"),
    pytest.param(lambda p: build_comparison([make_run(p / "r", n_steps=2), make_run(p / "s", n_steps=2)],
                                            p / "c", labels=["x"]), ReportError, "1 labels given for 2 runs",
                 id="compare-label-count"),
    pytest.param(lambda p: build_comparison([make_run(p / "r", n_steps=2), p / "missing"], p / "c"),
                 TraceError, "not a run folder", id="compare-missing-run"),
])
def test_bad_input(tmp_path, make_call, error, message):
    with pytest.raises(error, match=message) as info:
        make_call(tmp_path)
    assert isinstance(info.value, UsageError)


def _with_version(path: Path, version: int) -> Path:
    run = make_run(path / "r", n_steps=2)
    set_meta(run, version=version)
    return run


def _empty(path: Path) -> Path:
    TraceWriter(path / "r", DEFAULT_META).close()
    return path / "r"


def _blocked(path: Path) -> Path:
    blocker = path / "blocker"
    blocker.write_text("a file")
    return blocker


def test_clean_run_says_nothing_stands_out(tmp_path):
    with TraceWriter(tmp_path / "run", DEFAULT_META) as w:
        for step in range(5):
            w.step({"step": step, "loss": 1.0 / (step + 1), "loss/a": 1.0 / (step + 1), "grad/m": 0.1 * step + 0.1,
                    "mat/R/n": 4, "mat/R/rank": 4, "mat/R/log10_cond": 1.0, "mat/R/min_gap": 0.1,
                    "mat/R/lambda_max": 1.0, "mat/R/max_cluster": 1, "mat/R/vec_grad": 1.0})
        w.summary({"steps": 5, "wall_s": 1.0, "nonfinite_steps": [], "skipped_steps": [], "final_loss": 0.2,
                   "best_loss": 0.2, "status": "clean"})
    items = what_to_look_at(read_trace(tmp_path / "run"))
    assert len(items) == 1 and items[0].startswith("Nothing stands out")


class _CholeskyHead(torch.nn.Module):
    """A readout through the Cholesky factor of diag(1 .. 10^-6.2): log10 condition 6.2 in float32 (limit 5.9)."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.diag(torch.logspace(0, -6.2, 4)))

    def forward(self, y):
        return (torch.linalg.cholesky(self.A) @ y).sum()


def test_near_tie_and_ill_conditioned_inverse_are_flagged(tmp_path):
    """A real monitored ill-conditioned Cholesky: the monitor's hazard event and the report's item both name it."""
    model = _CholeskyHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with MonitorSession(StabilityMonitor(tmp_path / "chol", MonitorConfig(policy="observe")), model, opt) as s:
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            s.start_step(step, lr=1e-3)
            loss = model(torch.ones(4, 2))
            s.after_forward(loss)
            loss.backward()
            s.after_backward()
            s.end_step()
    trace = read_trace(tmp_path / "chol")
    (event,) = [e for e in trace.events if e["severity"] != "info"]
    assert (event["kind"], event["step"]) == ("ill_conditioned", 0)
    assert event["message"] == "model:linalg.cholesky: log10 condition number 6.2 > 5.9; this op inverts it"
    items = what_to_look_at(trace)
    assert any(i.startswith("`model:linalg.cholesky`: log10 condition number p95 = 6.2 > 5.9 for float32")
               for i in items), items
    flag = (0, "ill_conditioned event; ill-conditioned inverse")
    assert summarize_matrix(trace, "model:linalg.cholesky").first_flag == flag
    real, eps = precision(trace.meta)
    assert real == "float32" and eps == np.finfo(np.float32).eps
    with TraceWriter(tmp_path / "tie", {**DEFAULT_META, "dtype": "float32"}) as w:
        for step in range(3):
            w.step({"step": step, "lr": 1e-3 * (step + 1),
                    "mat/U/min_gap": 1e-9, "mat/U/lambda_max": 1.0, "mat/U/max_cluster": 1, "mat/U/vec_grad": 1.0,
                    "mat/f:linalg.cholesky/log10_cond": 3.0, "mat/f:linalg.cholesky/n": 4,
                    "mat/f:linalg.cholesky/rank": 4})
    items = what_to_look_at(read_trace(tmp_path / "tie"))
    assert any(i.startswith("`U`: eigenvalues nearly tie (smallest gap 1.0e-09 at step 0") for i in items)
    assert not any("f:linalg.cholesky" in i for i in items)  # log10 condition 3: fine in float32


def test_log10_cond_marks_singular_as_inf():
    stats = pd.DataFrame({"n": [4, 4, np.nan], "rank": [2, 4, np.nan], "log10_cond": [np.nan, 2.0, np.nan]})
    out = log10_cond_filled(stats)
    assert out.iloc[0] == math.inf and out.iloc[1] == 2.0 and math.isnan(out.iloc[2])


@pytest.mark.parametrize("value, text", [
    (None, "–"), (float("nan"), "–"), (float("inf"), "inf"), (0.0, "0"), (118.0, "118"), (np.int64(7), "7"),
    (0.0012345, "0.00123"), (1.5e-10, "1.50e-10"), (True, "yes"),
], ids=repr)
def test_fmt(value, text):
    assert md.fmt(value) == text


def test_markdown_builders():
    assert md.table(["a", "b"], [("x|y", "line\nbreak")], "lr") == "| a | b |\n|:--|--:|\n| x\\|y | line break |\n"
    assert md.steps_list([0, 1, 2, 5, 7, 8]) == "0–2, 5, 7–8"
    assert md.steps_list([]) == "none"
    assert md.span(5, 5) == "step 5" and md.span(0, 9) == "steps 0–9"
    assert md.steps_list(list(range(0, 40, 2)), limit=3) == "0, 2, 4, ... (+17 more ranges)"
    assert md.code("a`b") == "`` a`b ``"
    assert md.image("alt", "figures\\x.png") == "![alt](figures/x.png)\n"
    with pytest.raises(ValueError, match="absolute"):
        md.image("alt", "/tmp/x.png")
    with pytest.raises(ValueError, match="2 columns"):
        md.table(["a", "b"], [("only one",)])


def test_tie_located_by_tolerance_not_exact_zero(tmp_path):
    """Rounding leaves a loaded null space's eigenvalues ~1e-11 apart, not exactly equal: still a noise tie."""
    with TraceWriter(tmp_path / "run", DEFAULT_META) as w:
        for step in range(3):
            w.step({"step": step, "mat/R/n": 144, "mat/R/lambda_max": 0.2, "mat/R/max_cluster": 118,
                    "mat/R/cluster_value": 1e-3, "mat/R/min_gap": 1e-11, "mat/R/min_gap_noise": 1e-11,
                    "mat/R/min_gap_signal": 1e-3, "mat/R/gap_split": 1e-2, "mat/R/vec_grad": 1.0})
    summary = summarize_matrix(read_trace(tmp_path / "run"), "R")
    assert summary.tie_where == "noise" and summary.tie_steps == (0, 1, 2) and summary.vec_grad is True
    assert summary.first_flag == (0, "tie, vectors used")


def test_suspect_comes_from_the_monitor_event_and_cluster_values_show_a_range(tmp_path):
    with TraceWriter(tmp_path / "run", DEFAULT_META) as w:
        for step, (value, bad) in enumerate([(4e-9, False), (1e-3, True)]):
            w.step({"step": step, "nonfinite": bad,
                    "mat/A/max_cluster": 118, "mat/A/cluster_value": value, "mat/A/min_gap": 0.0,
                    "mat/A/vec_grad": 1.0,
                    "mat/B/max_cluster": 1, "mat/B/min_gap": 1e-2, "mat/B/vec_grad": 1.0})
            if bad:  # the monitor's own suspect wins over the smallest gap
                w.event("nonfinite_grad", "error", "non-finite gradient", step=step, matrix="B")
    items = what_to_look_at(read_trace(tmp_path / "run"))
    assert items[0].endswith("Suspect matrix there: `B` (smallest gap 1.0e-02, eigenvectors receive gradient).")
    assert "`A`: eigenvalues tie from step 0 (cluster of 118 at 4.0e-09 to 1.0e-03; 2 of 2" in items[1]


def test_single_step_run_with_no_finite_value(tmp_path):
    with TraceWriter(tmp_path / "run", {}) as w:
        w.step({"step": 5, "loss": math.nan, "loss/x": None, "nonfinite": True, "grad/a": math.nan,
                "mat/R/rank": 3, "mat/R/n": 4, "mat/R/log10_cond": None})
    report = build_report(tmp_path / "run")
    text = report.read_text()
    assert "| **steps logged** | 1 (step 5) |" in text and "**Non-finite at step 5**" in text
    assert "| `R` | 4 | 3 / 3 / 3 | inf / inf / inf |" in text
    assert "| `x` | – | – | – | – | – | 0 | 5 | no finite value |" in text
    assert len(assert_links_resolve(report)) == 5
