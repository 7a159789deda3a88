"""The pipeline's dtype-derived tolerances, named, in one place.

Every threshold here is a pure function of the dtype (and, where it matters, the problem size), so
the same code behaves consistently in float32/complex64 and float64/complex128. Complex dtypes use
the precision of their real part. Relative tolerances are dimensionless: callers multiply them by
the scale of the quantity they compare (e.g. max |lambda| of the matrix at hand).

The tie rule is not defined here: the pipeline uses THE rule of the code base,
``ris_stability.spectral.tie_rtol`` (the leaf op library whose gap-aware eigh it also uses).
"""

from __future__ import annotations

import torch

from ris_stability.spectral import eps_of, real_dtype_of, tie_rtol, tiny_of

__all__ = ["degenerate_tol", "eps_of", "real_dtype_of", "tiny_of"]


def degenerate_tol(dtype: torch.dtype, n: int) -> float:
    """Relative gap below which two eigenvalues of an n x n Hermitian matrix count as tied (the
    gap-aware eigh backward drops exactly these pairs): ``ris_stability.spectral.tie_rtol(n, dtype)``,
    relative to max|lambda|."""
    if n < 1:
        raise ValueError(f"degenerate_tol: matrix size n must be >= 1, got n={n}")
    return tie_rtol(n, dtype)
