"""`build_comparison`: several run folders -> one side-by-side report (overlaid figures, differences).

Canonical use: aligned vs misaligned loss covariance, loading vs no loading, torch vs gap-aware eigh.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ris_stability.records import Trace, read_trace
from ris_stability.report import markdown as md
from ris_stability.report import plots
from ris_stability.report.build import (
    MIN_STEPS_FOR_DEAD, REPORT_FILE, FIGURE_DIR, ReportError, figure_set, write_figures,
)
from ris_stability.report.derive import (
    MatrixSummary, final_and_best_loss, grad_summaries, loss_summaries, summarize_matrix,
)
from ris_stability.records.atomic import write_text_atomic
from ris_stability.report.look import what_to_look_at

logger = logging.getLogger(__name__)

COMPARISON_FILE = "comparison.md"
FIGURE_PREFIX = "compare_"


def _labels(run_dirs: list[Path], labels: list[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(run_dirs):
            raise ReportError(f"{len(labels)} labels given for {len(run_dirs)} runs; give one label per run "
                              "or none (the folder names are used).")
        if len(set(labels)) != len(labels):
            raise ReportError(f"labels must be distinct, got {labels}")
        return list(labels)
    names = [d.resolve().name for d in run_dirs]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def build_comparison(run_dirs: list[Path], out_dir: Path, labels: list[str] | None = None) -> Path:
    """Write out_dir/comparison.md and out_dir/figures/compare_*.png for 2-4 runs; returns the path.
    Raises TraceError for an unreadable run, ReportError for bad arguments or an unwritable out_dir."""
    run_dirs = [Path(d) for d in run_dirs]
    if not 2 <= len(run_dirs) <= len(plots.RUN_STYLES):
        raise ReportError(f"compare needs 2 to {len(plots.RUN_STYLES)} run folders, got {len(run_dirs)}")
    names = _labels(run_dirs, labels)
    traces = {label: read_trace(d) for label, d in zip(names, run_dirs)}
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create {out_dir}: {exc}. Pass a writable output folder.") from exc
    steps = {label: t.steps for label, t in traces.items()}
    colors = plots.palette({m for t in traces.values() for m in t.matrices})
    first_meta = next(iter(traces.values())).meta
    figures = figure_set(steps, first_meta, colors)
    links = write_figures(figures, out_dir / FIGURE_DIR, prefix=FIGURE_PREFIX)
    text = render_comparison(traces, {s: (figures[s][0], link) for s, link in links.items()}, out_dir)
    out = out_dir / COMPARISON_FILE
    try:
        write_text_atomic(out, text)
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc}. Pass a writable output folder.") from exc
    logger.info("comparison of %d runs written to %s", len(traces), out)
    return out


def _matrix_rows(traces: dict[str, Trace]) -> list[tuple[str, list[str]]]:
    summaries: dict[str, dict[str, MatrixSummary]] = {}
    for label, trace in traces.items():
        summaries[label] = {m: summarize_matrix(trace, m) for m in trace.matrices}
    rows = []
    for name in sorted({m for s in summaries.values() for m in s}):
        def per_run(getter) -> list[str]:
            return [getter(summaries[label][name]) if name in summaries[label] else "not recorded"
                    for label in traces]

        key = md.code(name)
        rows += [
            (f"{key} smallest gap", per_run(lambda m: md.fmt(m.min_gap))),
            (f"{key} largest tied cluster", per_run(lambda m: md.fmt(m.max_cluster))),
            (f"{key} log10 cond p95", per_run(lambda m: md.fmt(m.log10_cond[2]))),
            (f"{key} rank median", per_run(lambda m: md.fmt(m.rank[1]))),
            (f"{key} first flagged step", per_run(lambda m: str(m.first_flag[0]) if m.first_flag else "never")),
        ]
    return rows


def difference_rows(traces: dict[str, Trace]) -> list[tuple[str, list[str]]]:
    """(metric, one value per run) for the run-level numbers and every matrix of any run."""
    def each(fn) -> list[str]:
        return [fn(t) for t in traces.values()]

    def loss(t: Trace, which: int) -> str:
        return md.fmt(final_and_best_loss(t)[which], 4)

    rows = [
        ("status", each(lambda t: (t.summary or {}).get("status") or "incomplete")),
        ("config", each(lambda t: md.code(t.meta.get("config_path") or "–"))),
        ("dtype", each(lambda t: str(t.meta.get("dtype") or "–"))),
        ("steps logged", each(lambda t: str(len(t.steps)))),
        ("final loss", each(lambda t: loss(t, 0))),
        ("best loss", each(lambda t: loss(t, 1))),
        ("non-finite steps", each(lambda t: str(len(t.nonfinite_steps)))),
        ("first non-finite step", each(lambda t: str(t.nonfinite_steps[0]) if t.nonfinite_steps else "none")),
        ("skipped steps", each(lambda t: str(len(t.skipped_steps)))),
        ("dead loss terms", each(lambda t: ", ".join(s.name for s in loss_summaries(t) if s.constant) or "none")),
        ("modules without gradient", each(lambda t: ", ".join(
            s.name for s in grad_summaries(t) if s.finite_count >= MIN_STEPS_FOR_DEAD and s.max == 0) or "none")),
    ]
    return rows + _matrix_rows(traces)


def _link(target: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(target.resolve(), out_dir.resolve())).as_posix()


def render_comparison(traces: dict[str, Trace], figures: dict[str, tuple[str, str]], out_dir: Path) -> str:
    labels = list(traces)
    rows = difference_rows(traces)
    differ = [(k, v) for k, v in rows if len(set(v)) > 1]
    same = [(k, v) for k, v in rows if len(set(v)) == 1]
    styles = dict(zip(labels, ("solid", "dashed", "dotted", "dash-dot")))
    runs = []
    for label, trace in traces.items():
        report = trace.run_dir / REPORT_FILE
        link = f" — [report]({_link(report, out_dir)})" if report.exists() else ""
        runs.append(f"{md.code(label)}: {md.code(trace.run_dir.as_posix())}, drawn {styles[label]}{link}")
    blocks = [md.heading("Run comparison: " + " vs ".join(md.code(label) for label in labels), 1),
              md.bullets(runs), md.heading("Differences")]
    header = ["metric"] + labels
    blocks.append(md.table(header, [[k] + v for k, v in differ], "l" + "r" * len(labels)) if differ
                  else "The runs agree on every compared metric.\n")
    if same:
        blocks.append(md.details(f"Identical in all runs ({len(same)} metrics)",
                                 md.table(["metric", "value"], [(k, v[0]) for k, v in same])))
    blocks.append(md.heading("Figures (overlaid)"))
    blocks += [md.image(alt, link) for alt, link in figures.values()]
    blocks.append(md.heading("What to look at, per run"))
    for label, trace in traces.items():
        blocks += [md.heading(md.code(label), 3), md.numbered(what_to_look_at(trace))]
    return md.document(blocks)
