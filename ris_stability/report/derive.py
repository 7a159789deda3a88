"""What a trace says: per-matrix / per-module / per-term summaries and the hazards worth a look.

Pure functions of a `Trace` (no I/O, no plotting). Thresholds derive from the run's dtype eps through
ris_stability.numerics.tolerances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from ris_stability.records import GRAD_NONFINITE_PREFIX, Trace, matrix_stats
from ris_stability.linalg.hazards import CONDITION_OPS, EIG_OPS
from ris_stability.linalg.site_names import site_op
from ris_stability.numerics.tolerances import (PRECISION_GRAD_RTOL, TIE_MIN_N, eps_of, ill_conditioned_log10, real_dtype,
                                      tie_tol)

# A cluster of at least this many equal eigenvalues makes eigh backward divide 0 by 0.
TIED_CLUSTER_MIN = 2
# Fewer logged values than this cannot show that a term or module is "always" zero/constant.
MIN_STEPS_FOR_DEAD = 3
DEFAULT_DTYPE = torch.float32


def run_dtype(meta: dict) -> torch.dtype:
    """The run's dtype from meta['dtype'] ("complex64" or "torch.complex64"); float32 when unknown."""
    name = str(meta.get("dtype") or "").removeprefix("torch.")
    dtype = getattr(torch, name, None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex) \
        else DEFAULT_DTYPE


def precision(meta: dict) -> tuple[str, float]:
    """(real dtype name, machine eps) of the run, e.g. ("float32", 1.19e-07) for complex64."""
    dtype = run_dtype(meta)
    return str(real_dtype(dtype)).removeprefix("torch."), eps_of(dtype)


def near_tie_relative(eps: float, n: float = math.nan) -> float:
    """Relative gap (gap / lambda_max) below which the eigenvector gradient's rounding error, up to
    n * eps * lambda_max / gap, exceeds PRECISION_GRAD_RTOL of it (n unknown: TIE_MIN_N)."""
    n = n if math.isfinite(n) and n > 0 else TIE_MIN_N
    return n * eps / PRECISION_GRAD_RTOL


def log10_cond_filled(stats: pd.DataFrame) -> pd.Series:
    """log10 condition per step: +inf where the matrix was singular, NaN where it was not sampled or its
    statistics are NaN (the matrix itself held NaN/Inf, which says nothing about singularity).

    Traces written before steps.jsonl kept non-finite values apart stored a singular matrix's inf as
    null; such a null is read as +inf only where the recorded rank is finite and below n (a NaN-poisoned
    matrix has a NaN rank)."""
    if "log10_cond" not in stats:
        return pd.Series(np.nan, index=stats.index)
    values = stats["log10_cond"].copy()
    if "rank" in stats and "n" in stats:
        values[values.isna() & stats["rank"].notna() & (stats["rank"] < stats["n"])] = math.inf
    return values


def nan_stat_steps(stats: pd.DataFrame) -> list[int]:
    """Steps at which the matrix was recorded (n known) but its statistics are NaN: it held NaN/Inf."""
    if "n" not in stats or "lambda_max" not in stats:
        return []
    return [int(s) for s in stats.index[stats["n"].notna() & stats["lambda_max"].isna()]]


def _first(index: pd.Index) -> int | None:
    return int(index[0]) if len(index) else None


@dataclass(frozen=True)
class MatrixSummary:
    name: str
    n: float
    rank: tuple[float, float, float]          # min, median, max
    log10_cond: tuple[float, float, float]    # p5, p50, p95 (+inf: singular)
    range_log10_cond: tuple[float, float, float]  # p5, p50, p95 of log10(lambda_max / smallest above rank tol)
    min_gap: float
    min_gap_step: int | None
    gap_split_min: float
    max_cluster: float
    cluster_value: float
    cluster_step: int | None
    tie_steps: tuple[int, ...]                # steps with a tied cluster
    tie_values: tuple[float, float]           # min, max cluster_value over those steps
    tie_where: str                            # "noise", "signal" or "" (unknown part of the spectrum)
    vec_grad: bool | None                     # eigenvectors received gradient (None: not recorded)
    rel_gap_min: float                        # min_gap / lambda_max
    singular_steps: int
    first_flag: tuple[int, str] | None        # (step, reason)
    nan_steps: tuple[int, ...] = ()           # recorded with NaN statistics (the matrix held NaN/Inf)

    @property
    def op(self) -> str:
        """The site's op ('eig', 'solve', ...); '' for a watched matrix."""
        return site_op(self.name)

    @property
    def inverse_op(self) -> bool:
        """The op inverts the matrix, so its condition number is the hazard (ris_stability.linalg.hazards)."""
        return self.op in CONDITION_OPS


def _percentiles(values: pd.Series, qs=(5, 50, 95)) -> tuple[float, ...]:
    finite_or_inf = values.dropna().to_numpy(dtype=float)
    if not len(finite_or_inf):
        return tuple(math.nan for _ in qs)
    # "nearest" picks recorded values: no interpolation between inf and a number.
    return tuple(float(np.percentile(finite_or_inf, q, method="nearest")) for q in qs)


def _col(stats: pd.DataFrame, name: str) -> pd.Series:
    return stats[name] if name in stats else pd.Series(np.nan, index=stats.index)


def _argmin_step(series: pd.Series) -> int | None:
    series = series.dropna()
    return int(series.idxmin()) if len(series) else None


def _tie_where(stats: pd.DataFrame, tie_mask: pd.Series, dtype: torch.dtype) -> str:
    """Which subspace holds the tie: the one whose smallest gap is within the tie tolerance."""
    if not tie_mask.any():
        return ""
    n = float(_col(stats, "n").max())
    tol = tie_tol(int(n) if math.isfinite(n) else 0, dtype, _col(stats, "lambda_max").abs())
    for part in ("noise", "signal"):
        if (_col(stats, f"min_gap_{part}") <= tol)[tie_mask].any():
            return part
    return ""


def summarize_matrix(trace: Trace, name: str) -> MatrixSummary:
    """Table row of one watched/probed matrix over the whole run; thresholds from the run's dtype."""
    dtype = run_dtype(trace.meta)
    stats = matrix_stats(trace.steps, name)
    rank, gap, cluster = _col(stats, "rank"), _col(stats, "min_gap"), _col(stats, "max_cluster")
    vec = _col(stats, "vec_grad")
    tie_mask = cluster >= TIED_CLUSTER_MIN
    cluster_step = _argmin_step(-cluster)
    rel = gap / _col(stats, "lambda_max").abs().replace(0, np.nan)
    cond = log10_cond_filled(stats)
    summary = MatrixSummary(
        name=name, n=float(_col(stats, "n").max()),
        rank=(float(rank.min()), float(rank.median()), float(rank.max())),
        log10_cond=_percentiles(cond), range_log10_cond=_percentiles(_col(stats, "range_log10_cond")),
        min_gap=float(gap.min()), min_gap_step=_argmin_step(gap),
        gap_split_min=float(_col(stats, "gap_split").min()), max_cluster=float(cluster.max()),
        cluster_value=math.nan if cluster_step is None else float(_col(stats, "cluster_value")[cluster_step]),
        cluster_step=cluster_step, tie_steps=tuple(int(s) for s in stats.index[tie_mask]),
        tie_values=(float(_col(stats, "cluster_value")[tie_mask].min()),
                    float(_col(stats, "cluster_value")[tie_mask].max())),
        tie_where=_tie_where(stats, tie_mask, dtype),
        vec_grad=None if vec.isna().all() else bool((vec > 0).any()),
        rel_gap_min=float(rel.min()), singular_steps=int(np.isinf(cond).sum()), first_flag=None,
        nan_steps=tuple(nan_stat_steps(stats)),
    )
    return replace(summary, first_flag=_first_flag(summary, stats, cond, trace.events, dtype))


def _first_flag(s: MatrixSummary, stats: pd.DataFrame, cond: pd.Series, events: list[dict],
                dtype: torch.dtype) -> tuple[int, str] | None:
    """Earliest step at which an event names the matrix or a hazard shows in its statistics, with the
    reasons found at that step."""
    eps = eps_of(dtype)
    vec_used = _col(stats, "vec_grad") > 0
    candidates: list[tuple[int, str]] = []
    for event in events:
        if (event.get("data") or {}).get("matrix") == s.name and event.get("step") is not None:
            candidates.append((int(event["step"]), f"{event.get('kind')} event"))
    if s.op not in EIG_OPS:  # eig's realised backward terms are its measure (ris_stability.linalg.hazards)
        tie = _first(stats.index[(_col(stats, "max_cluster") >= TIED_CLUSTER_MIN) & vec_used])
        if tie is not None:
            candidates.append((tie, "tie, vectors used"))
        rel = _col(stats, "min_gap") / _col(stats, "lambda_max").abs()
        near = _first(stats.index[(rel > 0) & (rel < near_tie_relative(eps, s.n)) & vec_used])
        if near is not None:
            candidates.append((near, "near tie, vectors used"))
    if s.inverse_op:
        ill = _first(stats.index[cond > ill_conditioned_log10(dtype)])
        if ill is not None:
            candidates.append((ill, "ill-conditioned inverse"))
    if not candidates:
        return None
    step = min(c[0] for c in candidates)
    reasons = list(dict.fromkeys(r for c, r in candidates if c == step))
    if "tie, vectors used" in reasons and "near tie, vectors used" in reasons:
        reasons.remove("near tie, vectors used")  # the exact tie says it all
    return step, "; ".join(reasons)


@dataclass(frozen=True)
class SeriesSummary:
    """One loss term or one module's grad norm over the logged steps."""

    name: str
    first: float
    last: float
    median: float
    min: float
    max: float
    finite_count: int
    nonfinite_steps: tuple[int, ...]
    zero_steps: int

    @property
    def constant(self) -> bool:
        return self.finite_count >= MIN_STEPS_FOR_DEAD and self.min == self.max

    @property
    def always_zero(self) -> bool:
        return self.constant and self.max == 0


def summarize_series(name: str, values: pd.Series, bad_steps: list[int]) -> SeriesSummary:
    finite = values[np.isfinite(values)]
    flagged = set(bad_steps) | {int(s) for s in values.index[np.isinf(values)]}
    nonfinite = tuple(sorted(s for s in flagged if s in values.index))
    return SeriesSummary(
        name=name,
        first=float(finite.iloc[0]) if len(finite) else math.nan,
        last=float(finite.iloc[-1]) if len(finite) else math.nan,
        median=float(finite.median()), min=float(finite.min()), max=float(finite.max()),
        finite_count=int(len(finite)), nonfinite_steps=nonfinite, zero_steps=int((finite == 0).sum()),
    )


def loss_summaries(trace: Trace) -> list[SeriesSummary]:
    bad = trace.nonfinite_steps
    return [summarize_series(term, trace.steps[f"loss/{term}"],
                             [s for s in bad if np.isnan(trace.steps.at[s, f"loss/{term}"])]
                             if bad else [])
            for term in trace.loss_terms]


def grad_summaries(trace: Trace) -> list[SeriesSummary]:
    rows = []
    for module in trace.grad_modules:
        counts = trace.steps.get(f"{GRAD_NONFINITE_PREFIX}{module}")
        bad = [] if counts is None else [int(s) for s in counts.index[counts.fillna(0) > 0]]
        rows.append(summarize_series(module, trace.steps[f"grad/{module}"], bad))
    return rows


def event_names(trace: Trace, kind: str) -> list[str]:
    """Union of data.names over the events of one kind, in first-seen order."""
    names: dict[str, None] = {}
    for event in trace.events:
        if event.get("kind") == kind:
            for n in (event.get("data") or {}).get("names") or []:
                names[str(n)] = None
    return list(names)


@dataclass(frozen=True)
class EventGroup:
    kind: str
    severity: str
    steps: tuple[int, ...]
    count: int
    message: str


def condense_events(events: list[dict]) -> list[EventGroup]:
    """Events grouped by (kind, severity, matrix/names), in order of first occurrence."""
    groups: dict[tuple, dict[str, Any]] = {}
    for event in events:
        data = event.get("data") or {}
        key = (event.get("kind"), event.get("severity"), data.get("matrix"), tuple(data.get("names") or ()))
        group = groups.setdefault(key, {"steps": [], "count": 0, "message": str(event.get("message", ""))})
        group["count"] += 1
        if event.get("step") is not None:
            group["steps"].append(int(event["step"]))
    return [EventGroup(kind=str(k[0]), severity=str(k[1]), steps=tuple(sorted(set(g["steps"]))),
                       count=g["count"], message=g["message"]) for k, g in groups.items()]


def final_and_best_loss(trace: Trace) -> tuple[float, float, int | None]:
    """(final, best, best step): summary.json when present, else the last/min finite logged loss."""
    loss = trace.steps["loss"] if "loss" in trace.steps else pd.Series(dtype=float)
    finite = loss[np.isfinite(loss)]
    best_step = int(finite.idxmin()) if len(finite) else None
    final = float(finite.iloc[-1]) if len(finite) else math.nan
    best = float(finite.min()) if len(finite) else math.nan
    if trace.summary:  # the run's own accounting wins; null there means non-finite / none
        final = _float_or_nan(trace.summary.get("final_loss", final))
        best = _float_or_nan(trace.summary.get("best_loss", best))
    return final, best, best_step


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def spike_marks(events: list[dict]) -> dict[int, list[str]]:
    """step -> names of the modules that jumped, from the monitor's gradient_spike events."""
    marks: dict[int, list[str]] = {}
    for event in events:
        if event.get("kind") == "gradient_spike" and event.get("step") is not None:
            modules = (event.get("data") or {}).get("modules") or []
            marks[int(event["step"])] = [str(m.get("name")) for m in modules if isinstance(m, dict)]
    return marks


def explosion_marks(events: list[dict]) -> dict[int, list[str]]:
    """step -> names of the modules that grew most, from the monitor's gradient_explosion events."""
    marks: dict[int, list[str]] = {}
    for event in events:
        if event.get("kind") == "gradient_explosion" and event.get("step") is not None:
            modules = (event.get("data") or {}).get("modules") or []
            marks[int(event["step"])] = [str(m.get("name")) for m in modules[:1] if isinstance(m, dict)]
    return marks
