"""THE tie rule of the code base, and the pair weights the gap-aware backwards build from it.

Tie rule. A backward-stable eigensolver or SVD (LAPACK/cuSOLVER) returns the exact eigenvalues
(singular values) of a matrix within ``c(n) * eps * ||A||_2`` of the input; by Weyl's inequality each
computed value is then within ``n * eps * scale`` of the exact one (``c(n) = n``, the convention of
numpy.linalg.matrix_rank), ``scale`` being the largest magnitude. The two computed values of an exact
tie can therefore lie up to twice that apart. Below n = 8 the bound is too tight to cover the rounding
of forming the matrix itself (exact ties built as Q diag(lambda) Q^H come back up to ~9 eps * scale
apart whatever n, measured for n = 3..144 in complex64 and complex128). So two values count as tied when

    |x_i - x_j| <= tie_rtol(n, dtype) * scale,   tie_rtol = TIE_SPREAD * max(n, TIE_MIN_N) * eps(dtype)

The rule and machine epsilon are defined once, here (this leaf library imports nothing of the toolkit);
ris_stability.numerics.tolerances re-exports them with the toolkit's other dtype-derived tolerances.

Pair weights. The eigh backward weighs pair (i, j) by 1 / (x_j - x_i), the SVD backward by
1 / (s_j - s_i) and 1 / (s_j + s_i). :func:`lorentz` replaces such a 1/e (e relative to the scale) by

    0                    if |e| <= tau       (tied: the pair cannot be resolved, its term is dropped)
    e / (e^2 + w^2)      otherwise           (w: Lorentzian width, default tau)

so a tied pair contributes nothing instead of 0/0, and a near pair at most 1 / (2 w). The relative bias
on a resolved pair is w^2 / (e^2 + w^2) (< 1e-4 for gaps above 100 w).
"""
from __future__ import annotations

import torch


# PyTorch's eigh/svd backward refuse a loss whose gradient has an imaginary diagonal in V^H gV larger
# than this (allclose(..., rtol=1e-2, atol=1e-2)): such a loss depends on the arbitrary phase of complex
# singular/eigen-vectors. Kept identical so both backwards accept the same losses.
PHASE_INVARIANCE_ATOL = 1e-2


class ToleranceError(TypeError, ValueError):
    """A tolerance was requested for what has none: a dtype without a floating-point epsilon (a TypeError),
    a negative matrix size (a ValueError)."""


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real floating dtype matching ``dtype`` (complex64 -> float32, complex128 -> float64)."""
    if dtype.is_complex:
        return dtype.to_real()
    if dtype.is_floating_point:
        return dtype
    raise ToleranceError(
        f"no floating-point tolerance for dtype {dtype}: spectral statistics need a float or complex "
        "tensor; cast the matrix (e.g. .to(torch.float64)) before asking for its statistics"
    )


def eps_of(dtype: torch.dtype) -> float:
    """Machine epsilon of the real dtype matching ``dtype`` (complex64 -> float32's eps)."""
    return float(torch.finfo(real_dtype(dtype)).eps)


# THE tie rule (the gap-aware backwards of ris_stability.spectral drop exactly the pairs it calls tied;
# the reasoning is in ris_stability/spectral/rule.py). Two computed values of an exact tie are each off by
# up to the error bound, in opposite directions in the worst case, so their distance can reach twice it.
TIE_SPREAD = 2.0
# Below this size the n*eps bound does not cover the rounding of forming the matrix itself (exact ties built
# as Q diag(lambda) Q^H come back up to ~9 eps * scale apart whatever n).
TIE_MIN_N = 8


def tie_rtol(n: int, dtype: torch.dtype) -> float:
    """THE tie rule, relative to the largest magnitude: ``TIE_SPREAD * max(n, TIE_MIN_N) * eps(dtype)``.

    Two eigenvalues (or singular values) of an n x n problem closer than ``tie_rtol * scale`` cannot be
    told apart: the backward's 1/gap for them is 0/0 or amplified rounding noise.
    """
    if n < 0:
        raise ToleranceError(f"tie_rtol: matrix size n must be >= 0, got n={n}")
    return TIE_SPREAD * max(int(n), TIE_MIN_N) * eps_of(dtype)



class SpectralArgumentError(ValueError):
    """An invalid argument to a gap-aware decomposition (shape, eps, backward)."""


class PhaseDependenceError(RuntimeError):
    """The loss depends on the arbitrary phase of complex eigen/singular vectors: its gradient is undefined."""


def real_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The real dtype carrying the precision of ``dtype`` (complex64 -> float32, ...)."""
    return dtype.to_real() if dtype.is_complex else dtype


def tiny_of(dtype: torch.dtype) -> float:
    """Smallest positive normal number of ``dtype``: a floor for scales that may be exactly zero."""
    return float(torch.finfo(real_dtype_of(dtype)).tiny)


def check_eps(eps: float | None, where: str) -> float | None:
    """Validate a relative Lorentzian width (None: the dtype default = the tie threshold)."""
    if eps is None:
        return None
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (0.0 <= eps < float("inf")):
        raise SpectralArgumentError(
            f"{where}: eps (relative Lorentzian width, a fraction of the largest eigen/singular value) must be "
            f"a finite float >= 0 or None, got {eps!r}. Next step: pass None for the dtype default (= the tie "
            "threshold tie_rtol(n, dtype)), or 0.0 for masking tied pairs only."
        )
    return float(eps)


def lorentz(e: torch.Tensor, tau: float, width: float) -> torch.Tensor:
    """``e / (e^2 + w^2)`` with tied entries (``|e| <= tau``) set to 0; ``e`` relative (dimensionless).

    Returns a new tensor; never 0/0, also for ``width == 0``."""
    tied = e.abs() <= tau
    denom = torch.addcmul(e.new_full((), width * width), e, e)
    if width == 0:
        denom = denom.masked_fill(tied, 1.0)
    return (e / denom).masked_fill_(tied, 0.0)


def relative_scale(values: torch.Tensor) -> torch.Tensor:
    """max |x| per matrix, shape (..., 1), floored at the dtype's tiny so a zero matrix divides safely."""
    return values.abs().amax(dim=-1, keepdim=True).clamp_min(tiny_of(values.dtype))


def pair_weights(eigenvalues: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """F_ij of the eigh backward: 0 for tied pairs, Lorentzian-broadened 1 / (lambda_j - lambda_i) otherwise.

    eigenvalues: (..., n) real, ascending. eps: relative width (None: tie_rtol). Returns (..., n, n) real
    with a zero diagonal; F_ij -> 1 / (lambda_j - lambda_i) for wide gaps.
    """
    weights, scale = relative_pair_weights(eigenvalues, eps)
    return weights / scale.unsqueeze(-1)


def relative_pair_weights(eigenvalues: torch.Tensor, eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(F * s, s) with s = max|lambda| per matrix, shape (..., 1): the backward folds 1/s elsewhere."""
    n = eigenvalues.shape[-1]
    tau = tie_rtol(n, eigenvalues.dtype)
    scale = relative_scale(eigenvalues)
    lam = eigenvalues / scale  # relative units: thresholds are relative and e*e cannot overflow
    e = lam.unsqueeze(-2) - lam.unsqueeze(-1)
    return lorentz(e, tau, tau if eps is None else eps), scale


def check_phase_invariance(im_diag: torch.Tensor, where: str, what: str) -> None:
    """Raise like PyTorch when the loss depends on vector phases (|Im diag| of V^H gV above the tolerance).

    Non-finite entries are let through on purpose: an upstream NaN must surface as a NaN gradient, not as
    a misleading phase error.
    """
    im_diag = im_diag.abs()
    offending = im_diag > PHASE_INVARIANCE_ATOL  # False for NaN
    if bool(offending.any()):
        worst = float(im_diag[offending].amax())
        raise PhaseDependenceError(
            f"{where} backward: the loss depends on the phase of the complex {what} (max |Im diag| = "
            f"{worst:.3g} > {PHASE_INVARIANCE_ATOL}); they are only defined up to a factor e^{{i phi}}, so this "
            "gradient is ill-defined. Likely cause: a loss on raw vector entries (e.g. V[..., 0].real). Next "
            "step: use phase-invariant quantities such as projectors V V^H, |V|^2 or |v^H a|^2."
        )
