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

# THE tie rule and machine epsilon live in the leaf op library (spectral/rule.py: the gap-aware backwards and
# the showcase pipeline use them, and spectral may import nothing of the toolkit); re-exported here with the
# toolkit's other tolerances.
from ris_stability.spectral.rule import (  # noqa: F401
    TIE_MIN_N, TIE_SPREAD, ToleranceError, eps_of, real_dtype, tie_rtol,
)


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


# A float16 square root of max (256) is an ordinary gradient norm: for dtypes whose sqrt(max) is below this,
# the range limit of a gradient norm is RANGE_DECADES below max instead.
ROUTINE_NORM_MAX = 1e6
RANGE_DECADES = 2.0


def explosion_norm_limit(dtype: torch.dtype) -> float:
    """The gradient (or parameter) norm beyond which ``dtype`` is out of range for training: its square
    overflows (sqrt(finfo.max): 1.8e19 in float32 and bfloat16), so the sum of squares inside a norm, Adam's
    second moment, an L2 penalty or a covariance of the values turn inf. float16 (sqrt(max) = 256, a routine
    norm): RANGE_DECADES below finfo.max."""
    fi = torch.finfo(real_dtype(dtype))
    root = math.sqrt(fi.max)
    return root if root >= ROUTINE_NORM_MAX else fi.max / 10 ** RANGE_DECADES
