"""The right hazard per op: which statistic of a linear-algebra call site is a real hazard for that op.

* inverse, solve, lstsq, cholesky, det (and their aliases): the condition number / numerical rank, since
  they invert the matrix (an ill-conditioned input loses its digits there);
* pinv: the singular values near its cut-off (it drops the ones below, so its conditioning is bounded);
* eig / eigvals: nothing is inverted, so no condition number; the hazards are a Hermitian input (eigh
  gives real sorted eigenvalues and a backward without phase term) and, measured in backward, rounding
  that dominates the eig backward (the phase term, exactly 0 for a phase-invariant loss, against the
  gap-divided eigenvector terms). Tied eigenvalues of eig are not flagged from the spectrum: the eig
  backward divides only terms the loss feeds, so its realised terms (above) are the measure.
  Non-normality is recorded (``non_normal``) but not flagged: companion matrices are highly non-normal
  and harmless when their eigenvalues are separated.
* eigh / svd / watched matrices: gaps and tied clusters under eigenvector gradients (the one tie rule).

Pure functions over the probe's per-site records (``stats``, ``vec_grad``, ``backward``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ris_stability.linalg import registry
from ris_stability.linalg.registry import base_name
from ris_stability.linalg.op_spec import CONDITION, EIG, PINV
from ris_stability.numerics.tolerances import (PINV_CUTOFF_DECADES, PRECISION_GRAD_RTOL, hermitian_input_tol,
                                               ill_conditioned_log10)

# The base names each rule judges, every spelling and alias included (derived from the op registry).
CONDITION_OPS = registry.rule_names(CONDITION)
EIG_OPS = registry.rule_names(EIG)
PINV_OPS = registry.rule_names(PINV)
# The gap-aware eigh/SVD (ris_stability.spectral) drop tied pairs in backward: a tie is no hazard at their sites.
TIE_SAFE_MARK = "gap_aware"


def tie_safe(site_or_op: str) -> bool:
    """Whether a site (or op) name is one of the tie-safe backwards, e.g. 'loss.subspace:eigh_gap_aware'."""
    return TIE_SAFE_MARK in site_or_op


@dataclass(frozen=True)
class Hazard:
    kind: str          # event kind
    severity: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


def tie_message(name: str, op: str, location: str, cluster: float, value: float, nonfinite: bool = False) -> str:
    """The tied-cluster warning of a site, in the words of its op (eigenvalues or singular values). "0/0" only
    when the step's gradients did go non-finite (``nonfinite``); otherwise the tie is a risk: the backward
    divides by the zero gaps only where the loss's gradient has a share inside the cluster."""
    what = registry.info(op) or registry.OPS["eigh"].words
    vectors = vector_words(op)
    head = f"{name} ({location}): {int(cluster)} {what.values} tie at {value:.3e} and its {vectors} receive gradient"
    if nonfinite:
        return f"{head}, and this step's gradients are non-finite: {what.hazard}"
    divisor = "s_j^2 - s_i^2" if what.values == "singular values" else "eigenvalue gaps lambda_j - lambda_i"
    return (f"{head}: a risk, not a fault: the {vectors}' backward divides by {divisor}, which is 0/0 at a tie "
            "only where the loss's gradient has a share inside the cluster; this step's gradients are finite")


def vector_words(op: str) -> str:
    """'singular vectors' for an op of singular values, else 'eigenvectors'."""
    what = registry.info(op)
    return "singular vectors" if what is not None and what.values == "singular values" else "eigenvectors"


def eig_rounding_ratio(phase_noise: float, gap_terms: float) -> float:
    """Phase-term noise over gap terms of an eig backward; NaN when not measured."""
    if not (math.isfinite(phase_noise) and math.isfinite(gap_terms)):
        return math.nan
    return phase_noise / gap_terms if gap_terms > 0 else (math.inf if phase_noise > 0 else 0.0)


def site_hazards(name: str, site: dict[str, Any], dtype: torch.dtype, nonfinite: bool = False) -> list[Hazard]:
    """Hazards of one site's record at one step (each kind reported once per site by the caller);
    ``nonfinite``: the step's gradients went non-finite (a tie is then a fault, else a risk)."""
    op = base_name(site.get("op", ""))
    st = site.get("stats", {})
    if op in EIG_OPS:
        return _eig(name, op, st, site.get("backward") or {}, dtype)
    if op in PINV_OPS:
        return _pinv(name, st)
    out = _tie(name, site, st, nonfinite)
    if op in CONDITION_OPS:
        out += _condition(name, st, dtype)
    return out


def _tie(name: str, site: dict[str, Any], st: dict[str, float], nonfinite: bool) -> list[Hazard]:
    cluster = st.get("max_cluster", 0.0)
    if not (site.get("vec_grad") and cluster > 1) or tie_safe(site.get("op", "") or name):
        return []
    return [Hazard("tied_eigenvalues", "warning",  # in the op's own words: singular values for an svd
                   tie_message(name, site.get("op", ""), site.get("location", ""), cluster,
                               st.get("cluster_value", math.nan), nonfinite),
                   {"matrix": name, "max_cluster": cluster, "cluster_value": st.get("cluster_value"),
                    "vec_grad": True, "nonfinite": nonfinite, "location": site.get("location"), "module": site.get("module")})]


def _condition(name: str, st: dict[str, float], dtype: torch.dtype) -> list[Hazard]:
    lc, limit = st.get("log10_cond", math.nan), ill_conditioned_log10(dtype)
    if not lc > limit:  # NaN compares False; inf = singular
        return []
    what = (f"singular (numerical rank {int(st.get('rank', 0))} of {int(st.get('n', 0))})" if math.isinf(lc)
            else f"log10 condition number {lc:.1f} > {limit:.1f}")
    return [Hazard("ill_conditioned", "warning", f"{name}: {what}; this op inverts it",
                   {"matrix": name, "log10_cond": lc, "rank": st.get("rank")})]


def _pinv(name: str, st: dict[str, float]) -> list[Hazard]:
    margin = st.get("cutoff_margin", math.nan)
    if not margin < PINV_CUTOFF_DECADES:
        return []
    return [Hazard("pinv_cutoff", "warning",
                   f"{name}: a singular value lies within {10 ** margin:.2g}x of pinv's cut-off: whether it is "
                   "dropped (0) or inverted (1/s, the largest term) is decided by rounding; set rtol/atol away "
                   "from the spectrum or regularise", {"matrix": name, "cutoff_margin": margin})]


def _eig(name: str, op: str, st: dict[str, float], backward: dict[str, float], dtype: torch.dtype) -> list[Hazard]:
    out = []
    herm = st.get("herm_err", math.nan)
    if herm <= hermitian_input_tol(dtype):
        out.append(Hazard("eig_hermitian_input", "info",
                          f"{name}: torch.linalg.{op} of a Hermitian matrix (relative Hermitian error {herm:.1e}): "
                          f"use torch.linalg.{'eigh' if op == 'eig' else 'eigvalsh'}, which returns real sorted "
                          "eigenvalues and has no phase term in its backward", {"matrix": name, "herm_err": herm}))
    noise, terms = backward.get("phase_noise", math.nan), backward.get("gap_terms", math.nan)
    ratio = eig_rounding_ratio(noise, terms)
    if ratio > PRECISION_GRAD_RTOL:
        out.append(Hazard("eig_backward_rounding", "warning",
                          f"{name}: rounding dominates the eig backward: eigenvalues up to "
                          f"{st.get('lambda_max', math.nan):.1e}, phase term noise {noise:.1e} vs gap terms "
                          f"{terms:.1e} (the phase term is 0 in exact arithmetic for a phase-invariant loss); "
                          "compute this eig in complex128, use eigh for a Hermitian input, or rescale the matrix",
                          {"matrix": name, "phase_noise": noise, "gap_terms": terms,
                           "lambda_max": st.get("lambda_max")}))
    return out
