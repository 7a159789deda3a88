"""The report's "What to look at" list: hazards found in the trace, most severe first, in plain words."""

from __future__ import annotations

import numpy as np
import torch

from ris_stability.records import GRAD_NONFINITE_PREFIX, Trace
from ris_stability.report.derive import (
    MIN_STEPS_FOR_DEAD, TIED_CLUSTER_MIN, MatrixSummary, event_names, grad_summaries, loss_summaries,
    near_tie_relative, precision, run_dtype, summarize_matrix,
)
from ris_stability.report.markdown import MISSING, code, fmt, span, steps_list
from ris_stability.linalg.hazards import EIG_OPS, tie_safe, vector_words
from ris_stability.linalg.registry import info
from ris_stability.linalg.site_names import split_site
from ris_stability.report.incidents import incident_items, op_hazard_items
from ris_stability.numerics.tolerances import PRECISION_GRAD_RTOL, ill_conditioned_log10

def eigvec_remedy(real: str, meta: dict | None = None) -> str:
    """What to try against eigenvector-gradient blow-ups (float64 only when the run is not float64);
    the run's own switch when its integration wrote one in meta["remedies"]["eigenvector"]; never the
    gap-aware backward when the run already used it (meta["options"]["gap_aware"])."""
    tail = "" if real == "float64" else ", or float64 for the spectral part"
    if ((meta or {}).get("options") or {}).get("gap_aware"):
        return f"the gap-aware backward is already applied (--gap-aware): try an eigenvalue-only loss{tail}"
    own = ((meta or {}).get("remedies") or {}).get("eigenvector")
    return f"try {own or 'a gap-aware eigh backward (drops the pairs inside a degenerate cluster)'}, " \
           f"an eigenvalue-only loss{tail}"

# Tied-cluster values spanning more than this factor are reported as a range ("4.5e-09 to 1.0e-03").
CLUSTER_VALUE_SPREAD = 10.0
# A learning rate that never moves is only suspicious over a run long enough to have a schedule.
MIN_STEPS_FOR_LR_CHECK = 10


def what_to_look_at(trace: Trace, matrices: list[MatrixSummary] | None = None) -> list[str]:
    """Markdown bullet texts derived from the trace; a reassuring line when nothing stands out."""
    real, eps = precision(trace.meta)
    if matrices is None:
        matrices = [summarize_matrix(trace, name) for name in trace.matrices]
    items = _nonfinite_items(trace) + _finding_items(trace) + incident_items(trace)
    for m in matrices:
        items += _matrix_items(m, eps, real, len(trace.steps), run_dtype(trace.meta), trace.meta,
                               trace.nonfinite_steps)
        items += op_hazard_items(trace, m, run_dtype(trace.meta))
    items += _dead_term_items(trace) + _dead_module_items(trace) + _run_state_items(trace)
    items += _lr_items(trace)
    return items or ["Nothing stands out: every logged step is finite, no tied or nearly tied eigenvalues "
                     "under eigenvector gradients, no dead loss term or module."]


def _nonfinite_items(trace: Trace) -> list[str]:
    bad = trace.nonfinite_steps
    if not bad:
        return []
    first = bad[0]
    text = (f"**Non-finite at step {first}**" if len(bad) == 1 else
            f"**Non-finite at steps {steps_list(bad)}** (first: step {first})")
    text += f" — {len(bad)} of {len(trace.steps)} logged steps"
    skipped = [s for s in trace.skipped_steps if s in bad]
    if skipped:
        text += f", {len(skipped)} skipped"
    row = trace.steps.loc[first] if first in trace.steps.index else None
    if row is not None:
        terms = [t for t in trace.loss_terms if not np.isfinite(row[f"loss/{t}"])]
        if terms:
            text += f". Loss terms non-finite there: {', '.join(code(t) for t in terms)}"
        counts = [(c[len(GRAD_NONFINITE_PREFIX):], row[c]) for c in trace.steps.columns
                  if c.startswith(GRAD_NONFINITE_PREFIX) and row[c] > 0]
        if counts:
            text += "; non-finite gradient elements in " + ", ".join(
                f"{code(m)} ({fmt(n)})" for m, n in counts)
        text += _suspect(trace, first, row)
    text += _next_command(trace, first)
    return [text + "."]


def _next_command(trace: Trace, first: int) -> str:
    """The command that names the op of the first bad step, only one that will run: ``risdiag bisect`` needs
    a replayer (written into the capsule), ``risdiag locate`` re-runs a traced script's recorded command."""
    run = trace.run_dir.name  # from the folder holding the run: an absolute path would not survive a move
    capsule = next((p for p in trace.capsules if p.name == f"step_{first:06d}.pt"), None)
    written = [e.get("data") or {} for e in trace.events if e.get("kind") == "capsule_written" and e.get("step") == first]
    # None: not recorded (traces before the capsule_written event named its replayer)
    replayer = next((d["replayer"] for d in written if "replayer" in d), None)
    if capsule is not None and (replayer or replayer is None):
        rel = capsule.relative_to(trace.run_dir).as_posix()
        return (f". Capsule {code(rel)}: replay it with {code(f'risdiag bisect {run}/{rel}')} (from the folder "
                "holding the run) to name the op")
    if trace.finding and trace.finding.get("step") == first:
        return ""  # the finding below names the op
    if trace.meta.get("script") and not trace.meta.get("world_size", 1) > 1:  # locate re-runs one process
        return (f". Name the op with {code(f'risdiag locate {run}')} (from the folder holding the run): it re-runs "
                f"the recorded command up to step {first} with the locator armed there")
    if capsule is not None:
        rel = capsule.relative_to(trace.run_dir).as_posix()
        return (f". Capsule {code(rel)} names no replayer: write one (docs/script.md, 'Replaying later') and run "
                f"{code(f'risdiag bisect {run}/{rel} --replayer module:function')}")
    return ""


def _suspect(trace: Trace, step: int, row) -> str:
    """The matrix most likely behind a non-finite step: the one the monitor's event names, else the
    eigenvector-consuming matrix with the smallest gap at that step."""
    named = [(e.get("data") or {}).get("matrix") for e in trace.events
             if e.get("step") == step and e.get("kind") in ("nonfinite_loss", "nonfinite_grad")]
    candidates = [n for n in named if n in trace.matrices]
    eps = precision(trace.meta)[1]
    if not candidates:  # only with evidence at that step: a tie, a gap near rounding, or NaN in the matrix
        used = [n for n in trace.matrices if row.get(f"mat/{n}/vec_grad", 0) > 0 and _evidence(row, n, eps)]
        candidates = sorted(used, key=lambda n: _nan_last(row.get(f"mat/{n}/min_gap", np.nan)))
    if not candidates:
        return ""
    name = candidates[0]
    stat = lambda key: row.get(f"mat/{name}/{key}", np.nan)  # noqa: E731
    values = (info(split_site(name)[1]) or info("eigh")).values
    parts = []
    if stat("max_cluster") >= TIED_CLUSTER_MIN:
        parts.append(f"tied cluster of {fmt(stat('max_cluster'))} {values} at {sci(stat('cluster_value'))}")
    if np.isfinite(stat("min_gap")):
        parts.append(f"smallest gap {sci(stat('min_gap'))}")
    if stat("vec_grad") > 0:
        parts.append(f"{vector_words(split_site(name)[1])} receive gradient")
    return f". Suspect matrix there: {code(name)}" + (f" ({', '.join(parts)})" if parts else "")


def _evidence(row, name: str, eps: float) -> bool:
    stat = lambda key: row.get(f"mat/{name}/{key}", np.nan)  # noqa: E731
    if np.isnan(stat("lambda_max")) and not np.isnan(stat("n")):
        return True  # the matrix held NaN/Inf
    scale = abs(stat("lambda_max")) ** (2 if "svd" in split_site(name)[1] else 1)
    rel = stat("min_gap") / scale if scale > 0 else np.nan
    return bool(stat("max_cluster") >= TIED_CLUSTER_MIN or rel < near_tie_relative(eps, stat("n")))


def _nan_last(value: float) -> float:
    return np.inf if np.isnan(value) else value


def sci(value: float) -> str:
    """Eigenvalue-style number: '1.0e-03', '0', '–'."""
    return "0" if value == 0 else MISSING if np.isnan(value) else f"{value:.1e}"


def _finding_items(trace: Trace) -> list[str]:
    f = trace.finding
    if not f:
        return []
    where = ", ".join(f"{k} {code(f[k])}" for k in ("phase", "op", "node", "module", "location") if f.get(k))
    step = f" at step {f['step']}" if f.get("step") is not None else ""
    cause = f": {f['cause']}" if f.get("cause") else ""
    title = ("Finding" if f.get("source") else "Bisector finding") + (f" (rank {f['rank']})" if "rank" in f else "")
    origin = f"; {f['update_origin']}" if f.get("update_origin") else ""  # the update that grew the parameters
    return [f"**{title}{step}** — {where or 'see the finding section'}{cause}{origin}."]


def _matrix_items(m: MatrixSummary, eps: float, real: str, n_steps: int, dtype: torch.dtype,
                  meta: dict | None = None, nonfinite: list[int] = ()) -> list[str]:
    items = []
    name = code(m.name)
    if m.op in EIG_OPS:  # eig's hazards are its own (op_hazard_items): nothing is inverted, ties are not spectral
        return items
    values, vectors = (info(m.op) or info("eigh")).values, vector_words(m.op)
    if m.tie_steps and m.vec_grad is not False and not tie_safe(m.name):  # a gap-aware backward drops the ties
        part = f"{m.tie_where} {values}" if m.tie_where else values
        lo, hi = m.tie_values
        value = sci(lo) if not hi > max(lo, 0) * CLUSTER_VALUE_SPREAD else f"{sci(lo)} to {sci(hi)}"
        cluster = f"cluster of {fmt(m.max_cluster)} at {value}"
        text = (f"{name}: {part} tie from step {m.tie_steps[0]} ({cluster}; {len(m.tie_steps)} of "
                f"{n_steps} logged steps)")
        bad = sorted(set(m.tie_steps) & set(nonfinite))
        if m.vec_grad and bad:
            text += (f" while its {vectors} receive gradient, and the gradients went non-finite at step(s) "
                     f"{steps_list(bad)}: its {vectors}' gradients through the tie are 0/0 — "
                     + eigvec_remedy(real, meta) + ".")
        elif m.vec_grad:
            text += (f" while its {vectors} receive gradient: a risk, not a fault — every one of these steps stayed "
                     f"finite (the backward divides by the gaps only where the loss's gradient has a share inside "
                     f"the cluster); if it goes non-finite, {eigvec_remedy(real, meta)}.")
        else:
            text += (f". Whether its {vectors} receive gradient was not recorded; if they do, their gradients "
                     "through an exact tie are 0/0 where the loss's gradient has a share inside the cluster.")
        items.append(text)
    elif m.vec_grad and 0 < m.rel_gap_min < near_tie_relative(eps, m.n):
        items.append(
            f"{name}: {values} nearly tie (smallest gap {m.min_gap:.1e} at step {m.min_gap_step}, "
            f"{m.rel_gap_min:.1e} relative to the largest, below n eps / {PRECISION_GRAD_RTOL:g} = "
            f"{near_tie_relative(eps, m.n):.1e} for {real}) while its {vectors} receive gradient: their "
            f"gradient's rounding error, up to n eps lambda_max / gap, exceeds {PRECISION_GRAD_RTOL:.0%} of it, "
            f"and an exact tie makes it 0/0 — if it goes non-finite, {eigvec_remedy(real, meta)}.")
    p95 = m.log10_cond[2]
    limit = ill_conditioned_log10(dtype)
    if m.inverse_op and p95 > limit:
        items.append(
            f"{name}: log10 condition number p95 = {fmt(p95)} > {limit:.1f} for {real} (eps = {eps:.1e}): "
            "an inverse or solve through it keeps at most one correct digit — add diagonal loading, or use "
            "float64 for this op.")
    return items


def _dead_term_items(trace: Trace) -> list[str]:
    items, derived = [], set()
    for s in loss_summaries(trace):
        if s.always_zero:
            items.append(f"Loss term {code(s.name)} is identically 0 over all {s.finite_count} finite logged "
                         "steps: it adds no gradient (a swallowed exception, or a weight of 0?).")
        elif s.constant:
            items.append(f"Loss term {code(s.name)} is constant at {fmt(s.min)} over all {s.finite_count} "
                         "finite logged steps: it adds no gradient.")
        else:
            continue
        derived.add(s.name)
    flagged = [n for n in event_names(trace, "dead_loss_term") if n not in derived]
    if flagged:
        items.append(f"The monitor flagged loss term(s) {', '.join(code(n) for n in flagged)} as dead "
                     "(constant or zero).")
    return items


def _dead_module_items(trace: Trace) -> list[str]:
    items, dead = [], []
    for s in grad_summaries(trace):
        if s.finite_count >= MIN_STEPS_FOR_DEAD and s.max == 0:
            dead.append(s.name)
            items.append(f"Module {code(s.name)} never receives gradient (norm 0 at all {s.finite_count} "
                         "finite logged steps): check that its output reaches the loss.")
    params = [n for n in event_names(trace, "dead_parameter")
              if not any(n == d or n.startswith(d + ".") for d in dead)]
    if params:
        shown = ", ".join(code(n) for n in params[:8]) + (f" (+{len(params) - 8} more)" if len(params) > 8 else "")
        items.append(f"Parameters that never received a non-zero gradient: {shown}.")
    return items


def _run_state_items(trace: Trace) -> list[str]:
    first, last = int(trace.steps.index[0]), int(trace.steps.index[-1])
    items = []
    if trace.summary is None:
        cut = "; the last line of steps.jsonl was cut mid-write" if trace.truncated else ""
        items.append(f"The run did not finish (no summary.json): this report covers {len(trace.steps)} "
                     f"logged step(s), {span(first, last)}{cut}.")
    elif trace.summary.get("status") == "stopped":
        items.append(f"The run was stopped by the non-finite policy after step {last}.")
    return items


def _lr_items(trace: Trace) -> list[str]:
    lr = trace.steps["lr"].dropna() if "lr" in trace.steps else None
    if lr is None or len(lr) < MIN_STEPS_FOR_LR_CHECK or lr.min() != lr.max():
        return []
    return [f"The learning rate is constant at {fmt(lr.iloc[0])} over all {len(lr)} logged steps: expected "
            "without a schedule; if the config sets one, it is not applied."]
