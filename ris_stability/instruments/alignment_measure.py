"""How far apart two matrices are, and how many directions a matrix really has: the measurements of the
alignment check, in float64/complex128 whatever the inputs' dtype, with tolerances from numerics.tolerances."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from ris_stability.numerics.tolerances import eig_abs_err, eps_of, rank_tol


def coarse_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    return a.dtype if eps_of(a.dtype) >= eps_of(b.dtype) else b.dtype


def default_rtol(n: int, dtype: torch.dtype) -> float:
    """n * eps(dtype): differences below an eigensolver's backward error are invisible to linalg."""
    return float(eig_abs_err(n, dtype, 1.0))


def _per_sample(a: Tensor, b: Tensor) -> Tensor:
    """||a - b||_F / ||b||_F per (broadcast) sample, computed in complex128/float64."""
    wide = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    with torch.no_grad():
        x, y = a.detach().to(wide), b.detach().to(wide)
        num = torch.linalg.vector_norm(x - y, dim=(-2, -1))
        den = torch.linalg.vector_norm(y, dim=(-2, -1)).clamp_min(torch.finfo(torch.float64).tiny)
        return num / den


def relative_difference(a: Tensor, b: Tensor) -> float:
    """max over the batch of ||a - b||_F / ||b||_F, computed in complex128/float64."""
    return float(_per_sample(a, b).max())


def sample_difference(t: Tensor, ref: Tensor) -> float | None:
    """Per-sample relative difference with the batch dims flattened: equal sample counts pair up (a
    (1, N, N) training batch against an (N, N) inference matrix), the worst pair counts; a single matrix on
    one side is matched with the closest sample of the other (inference run on one sample of a training
    batch). None when the matrix shapes differ or the sample counts cannot be paired."""
    if t.shape[-2:] != ref.shape[-2:]:
        return None
    a, b = t.reshape(-1, *t.shape[-2:]), ref.reshape(-1, *ref.shape[-2:])
    if a.shape[0] == b.shape[0]:
        return float(_per_sample(a, b).max())
    if 1 in (a.shape[0], b.shape[0]):
        return float(_per_sample(a, b).min())
    return None


def numerical_rank(a: Tensor, dtype: torch.dtype | None = None) -> int:
    """Max over the batch of #singular values > rank_tol(n, dtype, s_max); ``dtype`` (default a's) is the
    precision the matrix was formed in (a complex64 matrix copied to complex128 still has float32 noise)."""
    with torch.no_grad():
        s = torch.linalg.svdvals(a.detach().to(torch.complex128 if a.is_complex() else torch.float64))
        tol = rank_tol(max(a.shape[-2:]), dtype or a.dtype, s[..., :1])
        return int((s > tol).sum(-1).max()) if s.numel() else 0


@contextmanager
def one_thread() -> Iterator[None]:
    """Small (n <= a few hundred) factorisations: a threaded LAPACK gains nothing at these sizes and, on
    shared cores, its spinning threads make each call 10-100x slower. The thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


__all__ = ["coarse_dtype", "default_rtol", "numerical_rank", "one_thread", "relative_difference", "sample_difference"]
