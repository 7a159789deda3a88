"""Every dtype-derived tolerance of the ris_stability toolkit, named, in one place.

All tolerances follow from one fact: a backward-stable Hermitian eigensolver (LAPACK/cuSOLVER ``heevd``)
returns the exact eigenvalues of ``A + E`` with ``||E||_2 <= c(n) * eps * ||A||_2``, and by Weyl's
inequality each computed eigenvalue is then within ``c(n) * eps * ||A||_2`` of the exact one. We take
``c(n) = n``, the convention of numpy.linalg.matrix_rank and MATLAB rank(); in practice the error is
closer to ``sqrt(n) * eps * ||A||_2``, so ``n`` leaves a margin. Singular values obey the same bound.
"""
from __future__ import annotations

import math

import torch



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


def eig_abs_err(n: int, dtype: torch.dtype, scale):
    """Absolute error bound ``n * eps * scale`` of each computed eigenvalue (or singular value) of an
    n x n matrix whose spectral norm is ``scale`` (float or tensor; tensors give tensors)."""
    return n * eps_of(dtype) * scale


def rank_tol(n: int, dtype: torch.dtype, lam_max):
    """Numerical-rank tolerance ``n * eps * lam_max``: an eigenvalue (or singular value) whose magnitude
    is at or below it cannot be told apart from zero. ``lam_max`` is the largest magnitude."""
    return eig_abs_err(n, dtype, lam_max)


def tie_tol(n: int, dtype: torch.dtype, scale):
    """Distance at or below which two computed eigenvalues count as an exact tie.

    Rule (:func:`tie_rtol`): ``TIE_SPREAD * max(n, TIE_MIN_N) * eps * scale`` with
    ``scale`` the spectral norm (largest eigenvalue magnitude). Each computed eigenvalue of an exact tie
    lies within ``n * eps * scale`` of the true value, so the two can be up to twice that apart; a pair
    closer than this is, for the eigh backward (which divides by the computed difference),
    indistinguishable from a tie: its eigenvector gradient is either 0/0 = NaN or noise amplified by
    1/(rounding error). The gap-aware backwards drop exactly these pairs.
    """
    real_dtype(dtype)  # integer dtypes: ToleranceError with its message
    return tie_rtol(n, dtype) * scale


# Decimal digits an inverse/solve must keep for its result to mean anything.
ILL_CONDITIONED_DIGITS_LEFT = 1.0


def ill_conditioned_log10(dtype: torch.dtype) -> float:
    """log10 condition number above which an inverse or solve in ``dtype`` keeps fewer than
    ILL_CONDITIONED_DIGITS_LEFT correct digits: log10(1/eps) - ILL_CONDITIONED_DIGITS_LEFT."""
    return -math.log10(eps_of(dtype)) - ILL_CONDITIONED_DIGITS_LEFT


# Relative gradient error (||g - g_float64|| / ||g_float64||) above which an op's precision counts as
# changing the gradient: 1 % is far above float32 rounding of a healthy gradient (~1e-6) and far
# below the errors that mislead training (the 200x of a complex64 eig backward at eigenvalues ~1e11).
PRECISION_GRAD_RTOL = 1e-2

# A matrix whose relative Hermitian error ||A - A^H|| / ||A|| is within this many eps of its dtype
# was built Hermitian (F F^H, (A + A^H)/2 leave a few eps of rounding): eigh applies.
HERMITIAN_INPUT_EPS = 100.0


def hermitian_input_tol(dtype: torch.dtype | str) -> float:
    """Relative Hermitian error at or below which an input counts as Hermitian (eigh applies)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return HERMITIAN_INPUT_EPS * eps_of(dtype)


# pinv drops singular values below its cut-off and inverts the rest: one within this many decades of
# the cut-off is dropped or kept by rounding.
PINV_CUTOFF_DECADES = 1.0


def cluster_leak_tol(dtype: torch.dtype) -> float:
    """Share of an eigh/svd vector gradient inside tied clusters at or below which the loss counts as invariant
    there (the gap-aware backward is then exact): sqrt(eps). Rounding puts ~n eps there for an invariant loss
    (far below for the sizes the toolkit meets); a loss that tells the cluster's vectors apart puts O(1)."""
    return math.sqrt(eps_of(dtype))


def zero_level(n: int, dtype: torch.dtype, scale):
    """Typical magnitude ``sqrt(n) * eps * scale`` of a computed eigenvalue (singular value) that is exactly 0:
    rounding errors of the n-term sums add like a random walk, so it sits well below the worst-case bound
    ``rank_tol``. A diagonal loading lifts the smallest eigenvalue above it (alpha tr/N is ~100 eps * scale at
    alpha = 1e-3, n = 144 in float32), a rank deficiency leaves it at or below it."""
    return math.sqrt(max(n, 1)) * eps_of(dtype) * scale
