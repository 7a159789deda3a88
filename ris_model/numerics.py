"""The pipeline's dtype-derived tolerances, named, in one place.

Every threshold here is a pure function of the dtype (and, where it matters, the problem size), so
the same code behaves consistently in float32/complex64 and float64/complex128. Complex dtypes use
the precision of their real part. Relative tolerances are dimensionless: callers multiply them by
the scale of the quantity they compare (e.g. max |lambda| of the matrix at hand).
"""

from __future__ import annotations

import torch

# PyTorch's linalg_eig(h)_backward refuses a loss whose gradient has an imaginary diagonal in
# V^H gV larger than this (allclose(Im diag, 0, rtol=1e-2, atol=1e-2)): such a loss depends on the
# arbitrary phase of complex eigenvectors. Kept identical so both backwards accept the same losses.
PHASE_INVARIANCE_ATOL = 1e-2

# Computed eigenvalues of an exactly tied cluster spread by up to ~1.6 * n * eps * max|lambda|
# (measured: 300 random unitaries per case, clusters of 2-6 in n = 4-8, float32..complex128; the
# spread shrinks relative to n as n grows). 4 leaves a 2.5x margin.
TIE_SPREAD_FACTOR = 4.0


def real_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The real dtype carrying the precision of `dtype` (complex64 -> float32, ...)."""
    return dtype.to_real() if dtype.is_complex else dtype


def eps_of(dtype: torch.dtype) -> float:
    """Machine epsilon of `dtype` (of its real part for complex dtypes)."""
    return torch.finfo(real_dtype_of(dtype)).eps


def tiny_of(dtype: torch.dtype) -> float:
    """Smallest positive normal number of `dtype`; a floor for scales that may be exactly zero."""
    return torch.finfo(real_dtype_of(dtype)).tiny


def degenerate_tol(dtype: torch.dtype, n: int) -> float:
    """Relative gap below which two eigenvalues of an n x n Hermitian matrix count as tied.

    A Hermitian eigensolver is backward stable: computed eigenvalues are exact for a matrix within
    ~p(n) * eps * ||A||_2 of the input (p(n) <= n in practice), so two eigenvalues closer than that
    cannot be told apart, and neither can their individual eigenvectors. The rule is
    TIE_SPREAD_FACTOR * n * eps, relative to max|lambda|.
    """
    if n < 1:
        raise ValueError(f"degenerate_tol: matrix size n must be >= 1, got n={n}")
    return TIE_SPREAD_FACTOR * n * eps_of(dtype)


def broadening_tol(dtype: torch.dtype, n: int) -> float:
    """Default relative Lorentzian width for near-degenerate eigenvalue pairs: degenerate_tol.

    A broadened pair weight e / (e^2 + w^2) is bounded by 1 / (2 w) and deviates from 1 / e by the
    relative amount w^2 / (e^2 + w^2). Torch's own pair term already carries a rounding error of
    ~eps / e (the eigenvector error of a pair with relative gap e), so w = degenerate_tol keeps the
    bias within a few times that noise for every pair the solver resolves to better than 1%, and the
    weights of pairs just above the tie threshold stay below 1 / (2 w) instead of jumping to 1 / w.
    (A wider width such as sqrt(eps) would also bias gapped pairs: 5e-4 at a 1.5% gap in float32.)
    """
    return degenerate_tol(dtype, n)
