"""L2 norms of many tensors at once (one fused kernel), in the precision that keeps a finite tensor's
norm finite: shared by the gradient monitor and the per-site backward records of the linear-algebra probe.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

FLAT_SCREEN_MAX = 1 << 24  # elements: up to this many (64 MB of float32) the CPU screen sums one flat copy
_NARROW = (torch.float32, torch.float16, torch.bfloat16)
_flatten = getattr(getattr(torch._C, "_nn", None), "flatten_dense_tensors", None)


def float64_norms(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """L2 norm of each tensor, accumulated and returned in float64: a float32 norm of finite values up
    to ~1e19 overflows to inf (its sum of squares exceeds float32's max), which would pass a huge but
    finite gradient for a non-finite one. Complex tensors are measured through their real view."""
    if not tensors:
        return ()
    real = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    return tuple(torch._foreach_norm(real, 2, dtype=torch.float64))


def fast_norms(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """L2 norm of each tensor accumulated in float32 (in float64 when one of them is float64), about 3x
    cheaper than :func:`float64_norms`. A finite result means every element is finite; an infinite one
    is a non-finite element or a float32 overflow of the sum of squares (elements beyond ~1e19), which
    only :func:`float64_norms` tells apart."""
    if not tensors:
        return ()
    try:  # the common case (dense real tensors of float32 or narrower) in one call, without a check per tensor
        return tuple(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    except (RuntimeError, NotImplementedError, TypeError):  # complex, float64, mixed devices
        pass
    real = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    wide = any(t.dtype == torch.float64 for t in real)
    return tuple(torch._foreach_norm(real, 2, dtype=torch.float64 if wide else torch.float32))


def norm64(t: Tensor) -> Tensor:
    """The L2 norm as a float64 0-d tensor, accumulated in the tensor's own precision (accumulating a large
    float32 tensor in float64 is ~10x slower on CPU; these norms only attribute a gradient to a site)."""
    return torch.linalg.vector_norm(torch.view_as_real(t) if t.is_complex() else t).to(torch.float64)


def peak_magnitudes(tensors: Sequence[Tensor]) -> Tensor:
    """The largest magnitude of each tensor, as one float32 vector on the first tensor's device (one fused
    kernel, no host read): NaN or Inf exactly when the tensor holds a NaN or Inf, since a maximum, unlike a
    sum of squares, never overflows. Sparse tensors are measured through their stored values."""
    dense = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    device = dense[0].device
    return torch.stack([n.to(device=device, dtype=torch.float32) for n in torch._foreach_norm(dense, float("inf"))])


def finite_screen(tensors: Sequence[Tensor]) -> Tensor:
    """One value per tensor, finite when the tensor is, as one vector on the first tensor's device (no host
    read): the largest magnitude on an accelerator (:func:`peak_magnitudes`, exact), the float32 L2 norm on
    CPU, where a max-magnitude reduction runs ~5x slower than a sum of squares and was most of the
    monitor's fixed cost per step. A non-finite value there is a NaN/Inf element or a float32 overflow
    of the sum of squares (elements beyond ~1e19): confirm it with :func:`peak_magnitudes` before calling
    the tensor non-finite."""
    if tensors and tensors[0].device.type == "cpu":
        try:  # dense tensors on the CPU without a check per tensor (fast_norms takes the common case in one call)
            return torch.stack(fast_norms(tensors))
        except (RuntimeError, NotImplementedError, TypeError):  # sparse, mixed devices
            pass
    dense = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    if any(t.device.type != "cpu" for t in dense):
        return peak_magnitudes(dense)
    return torch.stack(fast_norms(dense))


def flat_copy(tensors: Sequence[Tensor]) -> Tensor | None:
    """All of ``tensors`` copied into one flat vector in one call (no Python loop over them), or None where the
    cheap screen does not apply: not every tensor a dense real CPU tensor of float32-or-narrower dtypes (mixed
    ones are widened to the widest, exactly), or more than ``FLAT_SCREEN_MAX`` elements in all (a copy of a
    large model's gradients costs memory; the per-tensor screen copies nothing). ``flat.split(sizes)`` gives
    the tensors back, flattened."""
    if not tensors:
        return None
    first = tensors[0]
    if first.dtype not in _NARROW or first.device.type != "cpu":
        return None
    total = 0
    for t in tensors:
        total += t.numel()
    if total > FLAT_SCREEN_MAX:
        return None
    try:  # the copy itself refuses sparse tensors and other devices; a wider dtype shows in its result
        flat = _flatten(list(tensors)) if _flatten is not None else torch.cat([t.reshape(-1) for t in tensors])
    except RuntimeError:
        return None
    return flat if flat.dtype in _NARROW and flat.device.type == "cpu" else None


def flat_sum(flat: Tensor) -> Tensor:
    """The sum of a :func:`flat_copy` as a 0-d float32 tensor: finite when every element is, or a float32
    overflow of the sum (elements near 1e38 / n; confirm with :func:`peak_magnitudes`). Half-precision values
    are summed into float32, where their own range would overflow long before any element is infinite."""
    return flat.sum(dtype=torch.float32)


def screen_total(tensors: Sequence[Tensor]) -> Tensor:
    """One value finite when every tensor is (no host read), for a verdict that needs no per-tensor values:
    on CPU the sum of one flat copy (:func:`flat_copy`; on the 30 gradients of a small GPT about 60 us against
    about 145 us for a norm per tensor, measured in a loop), else the sum of :func:`finite_screen`. A
    non-finite value is a NaN/Inf element or an overflow: confirm it with :func:`peak_magnitudes` before
    calling a tensor non-finite."""
    flat = flat_copy(tensors)
    if flat is not None:
        return flat_sum(flat)
    return finite_screen(tensors).sum()
