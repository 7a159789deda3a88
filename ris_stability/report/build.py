"""`build_report`: a run folder's trace files -> report.md + figures/*.png (no re-training).

A crashed run (no summary.json, a cut last line) still gets a report of what it recorded.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

import pandas as pd

from ris_stability.records import UsageError, Trace, read_trace
from ris_stability.records.schema import EmptyTraceError
from ris_stability.report import markdown as md
from ris_stability.report.ranks import ranks_blocks, with_shards
from ris_stability.report import plots
from ris_stability.report.derive import (explosion_marks, spike_marks, 
    MIN_STEPS_FOR_DEAD, MatrixSummary, SeriesSummary, condense_events, event_names, final_and_best_loss, grad_summaries,
    loss_summaries, precision, summarize_matrix,
)
from ris_stability.records.atomic import write_text_atomic
from ris_stability.report.look import sci, what_to_look_at

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
FIGURE_DIR = "figures"
MAX_EVENT_ROWS = 30
FINDING_KEYS = ("step", "phase", "op", "node", "module", "location", "cause", "remedy", "verdict", "float64")


class ReportError(UsageError):
    """The report cannot be written (output not writable, bad arguments)."""


def figure_set(trace_or_steps: Trace | dict[str, pd.DataFrame], meta: dict,
               colors: dict | None = None) -> dict[str, tuple[str, Callable[[], object]]]:
    """file stem -> (alt text, figure factory) of the figures the data supports."""
    steps = trace_or_steps.steps if isinstance(trace_or_steps, Trace) else trace_or_steps
    frames = [steps] if isinstance(steps, pd.DataFrame) else list(steps.values())
    cols = {c for f in frames for c in f.columns}
    real, eps = precision(meta)
    figures: dict[str, tuple[str, Callable[[], object]]] = {}
    if any(c.startswith("mat/") for c in cols):
        figures["rank"] = ("numerical rank per matrix", lambda: plots.plot_rank(steps, colors))
        figures["cond"] = ("log10 condition number per matrix",
                           lambda: plots.plot_log10_cond(steps, colors, eps, real))
        figures["gaps"] = ("eigenvalue gaps per matrix", lambda: plots.plot_gaps(steps, colors))
    if any(c.startswith("grad/") for c in cols):
        spikes = spike_marks(trace_or_steps.events) if isinstance(trace_or_steps, Trace) else None
        explosions = explosion_marks(trace_or_steps.events) if isinstance(trace_or_steps, Trace) else None
        figures["grad_heatmap"] = ("gradient norm per module and step (rings: gradient spikes; squares: explosions)",
                                   lambda: plots.plot_grad_heatmap(steps, spikes, explosions))
    if "loss" in cols or any(c.startswith("loss/") for c in cols):
        figures["loss"] = ("loss terms over steps", lambda: plots.plot_loss_terms(steps))
    return figures


def write_figures(figures: dict[str, tuple[str, Callable]], fig_dir: Path, prefix: str = "") -> dict[str, str]:
    """Render and save each figure; returns stem -> link relative to fig_dir's parent."""
    links = {}
    for stem, (_, factory) in figures.items():
        name = f"{prefix}{stem}.png"
        try:
            plots.save_figure(factory(), fig_dir / name)
        except OSError as exc:
            raise ReportError(f"cannot write figure {fig_dir / name}: {exc}. Pass a writable --out.") from exc
        links[stem] = f"{fig_dir.name}/{name}"
    return links


def _resolve_out(run_dir: Path, out: Path | None) -> Path:
    out = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    if out.is_dir():
        out = out / REPORT_FILE
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create the report folder {out.parent}: {exc}. Pass a writable --out.") from exc
    return out


def build_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write report.md (default run_dir/report.md; a folder means folder/report.md) and figures/*.png
    next to it. Returns the report path. Raises TraceError / ReportError (both UsageError)."""
    try:
        trace = with_shards(read_trace(Path(run_dir)))
    except EmptyTraceError as err:  # a run that stopped before its first step still gets its report
        from ris_stability.report.outline import outline_report

        return outline_report(Path(run_dir), _resolve_out(Path(run_dir), out), str(err))
    out = _resolve_out(Path(run_dir), out)
    figures = figure_set(trace, trace.meta, plots.palette(trace.matrices))
    links = write_figures(figures, out.parent / FIGURE_DIR)
    text = render_report(trace, {stem: (figures[stem][0], link) for stem, link in links.items()})
    try:
        write_text_atomic(out, text)  # a kill while writing leaves the old report or none, never half of one
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc}. Pass a writable --out.") from exc
    logger.info("report written to %s (%d figures)", out, len(links))
    return out


def render_report(trace: Trace, figures: dict[str, tuple[str, str]]) -> str:
    """The report's Markdown; `figures` maps stem -> (alt text, relative link)."""
    real, eps = precision(trace.meta)
    matrices = [summarize_matrix(trace, name) for name in trace.matrices]
    image = lambda stem: md.image(*figures[stem]) if stem in figures else ""  # noqa: E731
    blocks = [md.heading(f"Stability report: {md.code(trace.run_dir.name)}", 1)]
    if trace.summary is None:
        blocks.append("> **Incomplete run**: no summary.json (the run crashed or was killed). "
                      "Everything below is what it recorded.\n")
    blocks += [md.heading("Run summary"), md.key_value_table(run_summary(trace)),
               md.heading("What to look at"), md.numbered(what_to_look_at(trace, matrices)),
               md.heading("Watched matrices"), matrix_table(matrices, real, eps),
               image("rank"), image("cond"), image("gaps"),
               md.heading("Gradient norms per module"), series_table(grad_summaries(trace), "module"),
               image("grad_heatmap"),
               md.heading("Loss terms"), series_table(loss_summaries(trace), "term"), image("loss"),
               md.heading("Events"), events_table(trace.events)]
    blocks += ranks_blocks(trace.run_dir)  # data-parallel runs: every rank's shard
    if trace.finding:
        source = str(trace.finding.get("source") or "")
        title = ("Finding (risdiag locate: re-run of the recorded command)" if source.startswith("risdiag locate")
                 else "Finding (in-process locator)" if source else "Bisector finding")
        title += f", rank {trace.finding['rank']}" if "rank" in trace.finding else ""
        blocks += [md.heading(title), finding_block(trace.finding)]
    return md.document(blocks)


def _names_or_none(names: list[str]) -> str:
    return ", ".join(md.code(n) for n in names) if names else "none"


def run_summary(trace: Trace) -> list[tuple[str, str]]:
    meta, summary, steps = trace.meta, trace.summary or {}, trace.steps
    final, best, best_step = final_and_best_loss(trace)
    status = summary.get("status") or "incomplete (no summary.json: crashed or killed)"
    if trace.truncated:
        status += "; last line of steps.jsonl cut mid-write"
    wall = (f"{summary['wall_s']:.1f} s" if summary.get("wall_s") is not None else
            f">= {steps['time_s'].max():.1f} s (time of the last logged step)" if "time_s" in steps else "–")
    config = md.code(meta["config_path"]) if meta.get("config_path") else "–"
    if meta.get("config_hash"):
        config += f" (sha256 {md.code(meta['config_hash'])})"
    dead_terms = sorted({s.name for s in loss_summaries(trace) if s.constant} | set(event_names(trace, "dead_loss_term")))
    dead_modules = [s.name for s in grad_summaries(trace) if s.finite_count >= MIN_STEPS_FOR_DEAD and s.max == 0]
    capsules = [p.relative_to(trace.run_dir).as_posix() for p in trace.capsules]
    return [
        ("status", status),
        ("command", md.code(meta["command"]) if meta.get("command") else md.MISSING),
        ("config", config),
        ("torch / device / dtype", " / ".join(str(meta.get(k) or "–") for k in ("torch", "device", "dtype"))),
        ("created", str(meta.get("created") or "–")),
        ("steps logged", f"{len(steps)} ({md.span(int(steps.index[0]), int(steps.index[-1]))})"
         + (f"; run length {summary['steps']}" if summary.get("steps") is not None else "")),
        ("wall time", wall),
        ("final loss", md.fmt(final, 4)),
        ("best loss", md.fmt(best, 4) + (f" (step {best_step})" if best_step is not None else "")),
        ("non-finite steps", md.steps_list(trace.nonfinite_steps)),
        ("skipped steps", md.steps_list(trace.skipped_steps)),
        ("dead loss terms", _names_or_none(dead_terms)),
        ("modules without gradient", _names_or_none(dead_modules)),
        ("dead parameters (events)", _names_or_none(event_names(trace, "dead_parameter"))),
        ("capsules", _names_or_none(capsules) + (f"; {summary['capsules_dropped']} more deleted by the capsule budget "
                                                  "(the first and the most recent are kept)"
                                                  if summary.get("capsules_dropped") else "")),
        ("AMP overflow steps (GradScaler)", md.steps_list(summary.get("amp_overflow_steps") or [])),
        ("not observed", "; ".join(summary.get("limitations") or []) or "–"),
    ]


def _triple(values: tuple[float, float, float]) -> str:
    return " / ".join(md.fmt(v, 3) for v in values)


def _cluster(m: MatrixSummary) -> str:
    if math.isnan(m.max_cluster):
        return md.MISSING
    if m.max_cluster < 2:
        return "1 (no tie)"
    return f"{md.fmt(m.max_cluster)} at {sci(m.cluster_value)} (step {m.cluster_step})"


def matrix_table(matrices: list[MatrixSummary], real: str, eps: float) -> str:
    if not matrices:
        return "No matrix statistics were recorded (no probe fired and nothing was watched).\n"
    rows = []
    for m in matrices:
        gap = md.fmt(m.min_gap) + (f" (step {m.min_gap_step})" if m.min_gap_step is not None else "")
        vec = {True: "yes", False: "no (eigenvalues only)", None: md.MISSING}[m.vec_grad]
        flag = f"{m.first_flag[0]} ({m.first_flag[1]})" if m.first_flag else "never"
        cond = _triple(m.log10_cond)
        if m.singular_steps and not all(math.isnan(v) for v in m.range_log10_cond):
            cond += f"<br>range: {_triple(m.range_log10_cond)}"
        rows.append((md.code(m.name), md.fmt(m.n), _triple(m.rank), cond, gap,
                     _cluster(m), vec, flag))
    note = (f"Worst over the sampled batch at each logged step. log10 cond = inf: singular; for a matrix singular "
            f"at some steps, 'range' is log10(lambda_max / smallest eigenvalue above the rank tolerance), how well "
            f"conditioned it is on the part of the space it spans (a covariance of fewer snapshots than its size "
            f"is singular by design: its range is what an inverse or a subspace method uses). A gap matters "
            f"when eigenvectors receive gradient (their backward divides by every pairwise gap); "
            f"dtype {real}, eps = {eps:.1e}.\n")
    poisoned = [f"{md.code(m.name)} at steps {md.steps_list(list(m.nan_steps), 6)}" for m in matrices if m.nan_steps]
    if poisoned:
        note += ("\nStatistics are NaN (the matrix itself held NaN/Inf; not counted as singular) for "
                 + "; ".join(poisoned) + ".\n")
    return md.table(["matrix", "n", "rank min / med / max", "log10 cond p5 / p50 / p95", "smallest gap",
                     "largest tied cluster", "eigvec grad", "first flagged step"], rows, "lrrrrrll") + "\n" + note


def series_table(summaries: list[SeriesSummary], what: str) -> str:
    if not summaries:
        return f"No per-{what} values were recorded.\n"
    rows = []
    for s in summaries:
        note = ("no finite value" if s.finite_count == 0 else "always 0" if s.always_zero
                else "constant" if s.constant else "")
        rows.append((md.code(s.name), md.fmt(s.first), md.fmt(s.median), md.fmt(s.min), md.fmt(s.max),
                     md.fmt(s.last), f"{s.zero_steps}", md.steps_list(list(s.nonfinite_steps), 6), note))
    return md.table([what, "first", "median", "min", "max", "last", "zero steps", "non-finite at", "note"],
                    rows, "lrrrrrrll")


def events_table(events: list[dict]) -> str:
    groups = condense_events(events)
    if not groups:
        return "No events were recorded.\n"
    rows = [(md.steps_list(list(g.steps), 6) if g.steps else md.MISSING, g.severity, md.code(g.kind), g.count, g.message)
            for g in groups[:MAX_EVENT_ROWS]]
    text = md.table(["steps", "severity", "kind", "count", "message (first of the group)"], rows, "lllrl")
    if len(groups) > MAX_EVENT_ROWS:
        text += f"\n{len(groups) - MAX_EVENT_ROWS} more event groups in events.jsonl.\n"
    return text


def finding_block(finding: dict) -> str:
    pairs = [(k, md.code(finding[k]) if k in ("op", "node", "module", "location") else md.fmt(finding[k]))
             for k in FINDING_KEYS if isinstance(finding.get(k), (str, int, float, bool))]
    pairs += [(k, md.fmt(v)) for k, v in finding.items()
              if k not in FINDING_KEYS and isinstance(v, (str, int, float, bool)) and v is not None]
    text = md.key_value_table(pairs) if pairs else ""
    nested = {k: v for k, v in finding.items() if isinstance(v, (list, dict)) and v}
    for key, value in nested.items():
        items = value if isinstance(value, list) else [value]
        body = md.bullets(md.code(json.dumps(item, sort_keys=True, default=str)) for item in items)
        text += "\n" + md.details(f"{key} ({len(items)})", body)
    return text
