"""Every linear-algebra entry point with a spectral hazard, and that hazard in its own words and units.

The probe observes the entry points of ``ris_stability.observe.intercept``; this module adds the ones whose
hazard is spectral but that are not decompositions (matrix norms of order 2, -2 and 'nuc', cond, det,
slogdet / logdet, lu / lu_factor, matrix_rank, the ``torch.*`` and Tensor-method spellings), chooses
per call what a norm call is (``refine``: a Frobenius or vector norm has no spectral hazard and is not
recorded), and holds the words of each op's hazard (:data:`OPS`): what the backward divides by, in which
units the statistic is reported. Pure data and pure functions; no torch call is made here at import
except looking the entry points up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ris_stability.observe import intercept

from ris_stability.linalg import site_stats


# Kinds whose statistics come from the spectrum the op returned: cheap enough for the whole batch.
SPECTRUM_KINDS = frozenset({"eigh", "eigvalsh", "svd", "svd_old", "svdvals"})


@dataclass(frozen=True)
class OpInfo:
    """``values``: "eigenvalues" or "singular values"; ``hazard``: the sentence; ``units``: of the gaps."""

    values: str
    hazard: str
    units: str
    divisor: str = ""  # what the vector backward divides by (eigh, svd): the words of a tie that is only a risk


_EIG = OpInfo("eigenvalues", "the eigenvector gradient divides by eigenvalue gaps lambda_j - lambda_i: a tie "
              "(gap 0) gives 0/0, a small gap amplifies by 1/gap", "gaps in eigenvalue units",
              "eigenvalue gaps lambda_j - lambda_i")
_SVD = OpInfo("singular values", "the singular-vector gradient divides by s_j^2 - s_i^2: tied singular values "
              "(including repeated zeros of a rank-deficient input) give 0/0", "gaps in squared singular values (s^2)",
              "s_j^2 - s_i^2")
_INVERT = OpInfo("singular values", "the op inverts the matrix: its output and gradient scale with 1/s_min, "
                 "so digits are lost in proportion to the condition number s_max/s_min", "log10 condition number")
OPS: dict[str, OpInfo] = {
    "eigh": _EIG, "eig": _EIG,
    "eigvalsh": OpInfo("eigenvalues", "eigenvalue-only: the gradient V diag(g) V^H is finite for any spectrum; "
                       "ties only make V non-unique", "eigenvalue units"),
    "eigvals": OpInfo("eigenvalues", "eigenvalue-only, but a non-normal input makes eigenvalues sensitive "
                      "(condition of the eigenvector matrix)", "eigenvalue units"),
    "svd": _SVD,
    "svdvals": OpInfo("singular values", "singular-value-only: the gradient U diag(g) V^H is finite for any "
                      "spectrum", "singular value units"),
    "matrix_norm_2": OpInfo("singular values", "the spectral norm s_1: its gradient u_1 v_1^H is undefined when "
                            "s_1 is tied (top gap s_1^2 - s_2^2 = 0)", "top gap in squared singular values (s^2)"),
    "matrix_norm_-2": OpInfo("singular values", "the smallest singular value s_n: its gradient u_n v_n^H is "
                             "undefined when s_n is tied (bottom gap s_(n-1)^2 - s_n^2 = 0)",
                             "bottom gap in squared singular values (s^2)"),
    "matrix_norm_nuc": OpInfo("singular values", "the nuclear norm sum(s): its gradient U V^H is undefined "
                              "where a singular value is 0 (rank-deficient input)", "s_min in singular value units"),
    "cond": OpInfo("singular values", "cond = s_max / s_min: its gradient scales as cond / s_min and needs s_1 "
                   "and s_n untied", "log10 condition number"),
    "det": OpInfo("singular values", "the determinant's gradient det(A) A^-H is 0 * inf at a singular matrix and "
                  "loses digits with the condition number", "log10 condition number"),
    "slogdet": OpInfo("singular values", "log|det|'s gradient A^-H scales with 1/s_min: infinite at a singular "
                      "matrix", "log10 condition number"),
    "lu": OpInfo("singular values", "LU pivots shrink with s_min: a singular matrix has a zero pivot and the "
                 "solve / backward divides by it", "log10 condition number"),
    "matrix_rank": OpInfo("singular values", "the rank counts singular values above a tolerance: values near it "
                          "flip the rank by rounding (no gradient)", "s_min in singular value units"),
    "qr": OpInfo("singular values", "R's diagonal vanishes for a rank-deficient input and the QR backward "
                 "divides by it", "log10 condition number"),
    "cholesky": OpInfo("eigenvalues", "needs lambda_min > 0: fails or loses digits as lambda_min / lambda_max "
                       "approaches rounding", "eigenvalue units and log10 condition number"),
    "inv": _INVERT, "solve": _INVERT, "lstsq": _INVERT,
    "pinv": OpInfo("singular values", "pinv inverts the singular values above its cut-off and drops the rest: "
                   "one near the cut-off is dropped or inverted by rounding", "decades from the cut-off"),
}
_ALIASES = {"eigvalsh": "eigvalsh", "svd_old": "svd", "cholesky_ex": "cholesky", "inv_ex": "inv",
            "inverse": "inv", "solve_ex": "solve", "pinverse": "pinv", "logdet": "slogdet", "lu_factor": "lu",
            "lu_factor_ex": "lu"}


def info(op: str) -> OpInfo | None:
    """The hazard of a probe op name ('linalg.svd', 'svd', 'linalg.matrix_norm(ord=2)')."""
    base = op.split("(")[0].rsplit(".", 1)[-1]
    key = {"ord=2": "matrix_norm_2", "ord=-2": "matrix_norm_-2", "ord=nuc": "matrix_norm_nuc"}.get(
        op[op.find("(") + 1:-1] if "(" in op else "", _ALIASES.get(base, base))
    return OPS.get(key)


def tie_message(name: str, op: str, location: str, cluster: float, value: float, nonfinite: bool = False) -> str:
    """The tied-cluster warning of a site, in the words of its op (eigenvalues or singular values). "0/0" only
    when the step's gradients did go non-finite (``nonfinite``); otherwise the tie is a risk: the backward
    divides by the zero gaps only where the loss's gradient has a share inside the cluster."""
    what = info(op) or _EIG
    vectors = vector_words(op)
    head = f"{name} ({location}): {int(cluster)} {what.values} tie at {value:.3e} and its {vectors} receive gradient"
    if nonfinite:
        return f"{head}, and this step's gradients are non-finite: {what.hazard}"
    divisor = what.divisor or "the gaps"
    return (f"{head}: a risk, not a fault: the {vectors}' backward divides by {divisor}, which is 0/0 at a tie "
            "only where the loss's gradient has a share inside the cluster; this step's gradients are finite")


def vector_words(op: str) -> str:
    """'singular vectors' for an op of singular values, else 'eigenvectors'."""
    what = info(op)
    return "singular vectors" if what is not None and what.values == "singular values" else "eigenvectors"


def split_site(name: str) -> tuple[str, str, str, str]:
    """(module, op, shape, location) of a probe site name ``module:op[shape]@file:line``; the shape and
    location parts appear only when needed to tell two records apart, and module is "" outside modules.
    Step columns ``mat/<site>/<stat>`` split at the first and the last '/' (a location may hold '/')."""
    head, _, location = name.partition("@")
    head, _, shape = head.partition("[")
    module, _, op = head.rpartition(":")
    return module, op, shape.rstrip("]"), location


# --- norms: which calls are spectral -------------------------------------------------------------------
def _arg(args: tuple, kwargs: dict, index: int, *names: str) -> Any:
    if len(args) > index:
        return args[index]
    return next((kwargs[n] for n in names if n in kwargs), None)


def refine(name: str, kind: str, args: tuple, kwargs: dict) -> tuple[str, str] | None:
    """(name, kind) to record for this call, or None when it has no spectral hazard (a Frobenius or vector
    norm). Ops other than norms pass unchanged."""
    if kind != "norm":
        return name, kind
    A = _arg(args, kwargs, 0, "A", "input")
    order = _arg(args, kwargs, 1, "ord", "p")
    dim = _arg(args, kwargs, 2, "dim")
    if not isinstance(A, Tensor) or A.dim() < 2 or isinstance(order, bool) or order not in (2, -2, "nuc"):
        return None
    matrix = (isinstance(dim, (tuple, list)) and len(dim) == 2) or (
        dim is None and (name == "linalg.matrix_norm" or A.dim() == 2))
    if not matrix or (name == "norm" and order != "nuc"):  # torch.norm(A, p=2): 2-norm of all entries
        return None
    return f"{name}(ord={order})", f"norm_{order}"


def _norm_stats(order: Any):
    def stats(flat: Tensor, out: Any, k) -> dict[str, Tensor]:
        r = min(flat.shape[-2:])
        split = 1 if order == 2 else (r - 1 if order == -2 else None)
        return site_stats.general_stats(flat, None, split)
    return stats


_NEW = (
    (torch.linalg, "matrix_norm", "linalg.matrix_norm", "norm"),
    (torch.linalg, "norm", "linalg.norm", "norm"),
    (torch, "norm", "norm", "norm"),
    (torch.Tensor, "norm", "norm", "norm"),
    (torch.linalg, "cond", "linalg.cond", "general"),
    (torch.linalg, "det", "linalg.det", "general"),
    (torch, "det", "det", "general"),
    (torch.Tensor, "det", "det", "general"),
    (torch.linalg, "slogdet", "linalg.slogdet", "general"),
    (torch, "slogdet", "slogdet", "general"),
    (torch.Tensor, "slogdet", "slogdet", "general"),
    (torch, "logdet", "logdet", "general"),
    (torch.Tensor, "logdet", "logdet", "general"),
    (torch.linalg, "lu", "linalg.lu", "general"),
    (torch.linalg, "lu_factor", "linalg.lu_factor", "general"),
    (torch.linalg, "lu_factor_ex", "linalg.lu_factor_ex", "general"),
    (torch.linalg, "matrix_rank", "linalg.matrix_rank", "general"),
    (torch.Tensor, "qr", "qr", "general"),
    (torch, "qr", "qr", "general"),
)


def _matrix_order(args: tuple, kwargs: dict) -> bool:
    """The wrapper's pre-test for norms: only orders 2, -2 and 'nuc' can be spectral (refine decides)."""
    order = args[1] if len(args) > 1 else kwargs.get("ord", kwargs.get("p"))
    return order in (2, -2, "nuc") and not isinstance(order, bool)


def _register() -> None:
    for owner, attr, name, kind in _NEW:
        if hasattr(owner, attr):
            intercept.add_entry_point(owner, attr, name, kind, _matrix_order if kind == "norm" else None)
    # "norm" is resolved per call by refine(); its kinds are the orders that have a spectral hazard.
    for order in (2, -2, "nuc"):
        site_stats.register_kind(f"norm_{order}", _norm_stats(order))


_register()
