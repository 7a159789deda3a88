"""The only real<->complex packing and the matrix normalisations shared by the whole pipeline."""

from __future__ import annotations

import torch
from torch import Tensor


class ZeroTraceError(ValueError):
    """A covariance had (numerically) zero trace, so it cannot be trace-normalised."""


def complex_dtype(real_dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}[real_dtype]


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def pack(z: Tensor) -> Tensor:
    """Complex (...,) -> real (..., 2) with (real, imag) last, for network inputs."""
    return torch.view_as_real(z)


def hermitise(R: Tensor) -> Tensor:
    """(R + R^H) / 2 over the last two dims."""
    return 0.5 * (R + R.mH)


def trace(R: Tensor) -> Tensor:
    """Real part of the trace over the last two dims, shape (...,)."""
    return torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1)


def trace_normalise(R: Tensor, name: str = "R") -> Tensor:
    """R / tr(R). A (numerically) zero trace is an error, never a silent division by an epsilon."""
    tr = trace(R)
    floor = torch.finfo(tr.dtype).tiny
    bad = ~(tr.abs() > floor) | ~torch.isfinite(tr)
    if bool(bad.any()):
        idx = torch.nonzero(bad.reshape(-1)).reshape(-1)[:5].tolist()
        raise ZeroTraceError(
            f"{name}: trace is zero or non-finite for batch item(s) {idx} (value {tr.reshape(-1)[idx[0]]:.3g}); "
            "a covariance with no energy cannot be normalised. Likely cause: all-zero factors or an "
            "all-zero sample covariance; check the network outputs and the measurements of that sample.")
    return R / tr[..., None, None].to(R.dtype)


def quad_form(a: Tensor, X: Tensor) -> Tensor:
    """a^H X a for vectors a (..., N) and matrices X (..., N, N): the conjugate transpose, always."""
    return torch.einsum("...i,...ij,...j->...", a.conj(), X, a)


def outer(A: Tensor) -> Tensor:
    """A A^H for a factor matrix A (..., N, K)."""
    return A @ A.mH
