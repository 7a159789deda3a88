"""What a trace says: per-matrix / per-module / per-term summaries and the hazards worth a look.

Pure functions of a `Trace` (no I/O, no plotting). Thresholds derive from the run's dtype eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ris_stability.records import GRAD_NONFINITE_PREFIX, Trace, matrix_stats

# A cluster of at least this many exactly equal eigenvalues makes eigh backward divide 0 by 0.
TIED_CLUSTER_MIN = 2
# Fewer logged values than this cannot show that a term or module is "always" zero/constant.
MIN_STEPS_FOR_DEAD = 3
# Ops whose backward/forward go through an inverse, so a condition number >= 1/eps loses all digits.
INVERSE_OPS = ("inv", "solve", "cholesky", "lstsq", "pinv")
# dtype names -> real precision used for eps (complex64 carries float32 parts).
_REAL_OF = {"complex64": "float32", "complex128": "float64", "cfloat": "float32", "cdouble": "float64",
            "float": "float32", "double": "float64", "half": "float16", "bfloat16": "float32"}
DEFAULT_PRECISION = "float32"


def precision(meta: dict) -> tuple[str, float]:
    """(real dtype name, machine eps) of the run, from meta['dtype']; float32 when unknown."""
    name = str(meta.get("dtype") or "").removeprefix("torch.")
    real = _REAL_OF.get(name, name)
    try:
        return real, float(np.finfo(real).eps)
    except TypeError:
        return DEFAULT_PRECISION, float(np.finfo(DEFAULT_PRECISION).eps)


def log10_cond_filled(stats: pd.DataFrame) -> pd.Series:
    """log10 condition per step, +inf where the matrix was singular (cond written as null), NaN where
    the matrix was not sampled."""
    if "log10_cond" not in stats:
        return pd.Series(np.nan, index=stats.index)
    values = stats["log10_cond"].copy()
    sampled = stats[[c for c in ("n", "rank", "lambda_min") if c in stats]].notna().any(axis=1)
    singular = values.isna() & sampled
    if "rank" in stats and "n" in stats:
        singular &= (stats["rank"] < stats["n"]) | stats["rank"].isna()
    values[singular] = math.inf
    return values


def _first(index: pd.Index) -> int | None:
    return int(index[0]) if len(index) else None


@dataclass(frozen=True)
class MatrixSummary:
    name: str
    n: float
    rank: tuple[float, float, float]          # min, median, max
    log10_cond: tuple[float, float, float]    # p5, p50, p95 (+inf: singular)
    min_gap: float
    min_gap_step: int | None
    gap_split_min: float
    max_cluster: float
    cluster_value: float
    cluster_step: int | None
    tie_steps: tuple[int, ...]                # steps with a tied cluster
    tie_where: str                            # "noise", "signal" or "" (unknown part of the spectrum)
    vec_grad: bool | None                     # eigenvectors received gradient (None: not recorded)
    rel_gap_min: float                        # min_gap / lambda_max
    singular_steps: int
    first_flag: tuple[int, str] | None        # (step, reason)

    @property
    def inverse_op(self) -> bool:
        return any(op in self.name.lower() for op in INVERSE_OPS)


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


def summarize_matrix(trace: Trace, name: str, eps: float) -> MatrixSummary:
    stats = matrix_stats(trace.steps, name)
    rank, gap, cluster = _col(stats, "rank"), _col(stats, "min_gap"), _col(stats, "max_cluster")
    vec = _col(stats, "vec_grad")
    tie_mask = cluster >= TIED_CLUSTER_MIN
    tie_where = ""
    if tie_mask.any() and (_col(stats, "min_gap_noise")[tie_mask] == 0).any():
        tie_where = "noise"
    elif tie_mask.any() and (_col(stats, "min_gap_signal")[tie_mask] == 0).any():
        tie_where = "signal"
    cluster_step = _argmin_step(-cluster)
    rel = gap / _col(stats, "lambda_max").abs().replace(0, np.nan)
    cond = log10_cond_filled(stats)
    summary = MatrixSummary(
        name=name, n=float(_col(stats, "n").max()),
        rank=(float(rank.min()), float(rank.median()), float(rank.max())),
        log10_cond=_percentiles(cond), min_gap=float(gap.min()), min_gap_step=_argmin_step(gap),
        gap_split_min=float(_col(stats, "gap_split").min()), max_cluster=float(cluster.max()),
        cluster_value=float(_col(stats, "cluster_value").get(cluster_step, np.nan)) if cluster_step is not None
        else math.nan,
        cluster_step=cluster_step, tie_steps=tuple(int(s) for s in stats.index[tie_mask]),
        tie_where=tie_where, vec_grad=None if vec.isna().all() else bool((vec > 0).any()),
        rel_gap_min=float(rel.min()), singular_steps=int(np.isinf(cond).sum()), first_flag=None,
    )
    return _with_first_flag(summary, stats, cond, trace.events, eps)


def _with_first_flag(s: MatrixSummary, stats: pd.DataFrame, cond: pd.Series, events: list[dict],
                     eps: float) -> MatrixSummary:
    """Earliest step at which an event names the matrix or a hazard shows in its statistics."""
    vec_used = _col(stats, "vec_grad") > 0
    candidates: list[tuple[int, str]] = []
    for event in events:
        if (event.get("data") or {}).get("matrix") == s.name and event.get("step") is not None:
            candidates.append((int(event["step"]), f"event {event.get('kind')}"))
    tie = _first(stats.index[(_col(stats, "max_cluster") >= TIED_CLUSTER_MIN) & vec_used])
    if tie is not None:
        candidates.append((tie, "tie, vectors used"))
    rel = _col(stats, "min_gap") / _col(stats, "lambda_max").abs()
    near = _first(stats.index[(rel > 0) & (rel < math.sqrt(eps)) & vec_used])
    if near is not None:
        candidates.append((near, "near tie, vectors used"))
    if s.inverse_op:
        ill = _first(stats.index[cond >= -math.log10(eps)])
        if ill is not None:
            candidates.append((ill, "cond >= 1/eps"))
    if not candidates:
        return s
    step = min(c[0] for c in candidates)
    reasons = "; ".join(dict.fromkeys(r for c, r in candidates if c == step))
    return _replace(s, first_flag=(step, reasons))


def _replace(s: MatrixSummary, **changes: Any) -> MatrixSummary:
    from dataclasses import replace

    return replace(s, **changes)


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
