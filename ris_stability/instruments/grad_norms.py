"""Per-parameter gradient measurements as one (P,) device vector each (no host read): L2 norms and counts
of non-finite entries, 0 for a parameter without a gradient. Used by the gradient monitor (grads.py)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ris_stability.numerics.norms import fast_norms, float64_norms


def _dense(grad: Tensor) -> Tensor:
    return grad.coalesce().values() if grad.is_sparse else grad


def per_param(params: Sequence[nn.Parameter], values: Sequence[Tensor], device: torch.device,
               dtype: torch.dtype, index_cache: dict | None = None) -> Tensor:
    """(P,) tensor on ``device``: the 0-d ``values`` (one per parameter with a grad, in order) and 0 for
    parameters without a grad. One stack and one cast, not one kernel per parameter."""
    present = tuple(i for i, p in enumerate(params) if p.grad is not None)
    if not present:
        return torch.zeros(len(params), dtype=dtype, device=device)
    stacked = torch.stack([v if v.device == device else v.to(device) for v in values]).to(dtype)
    if len(present) == len(params):
        return stacked
    cache = {} if index_cache is None else index_cache
    if present not in cache:  # a host-to-device copy, so built once per pattern of missing grads
        cache[present] = torch.tensor(present, dtype=torch.long, device=device)
    return torch.zeros(len(params), dtype=dtype, device=device).index_copy_(0, cache[present], stacked)


def present_grads(params: Sequence[nn.Parameter]) -> list[Tensor]:
    return [_dense(p.grad) for p in params if p.grad is not None]


def grad_norms(params: Sequence[nn.Parameter], device: torch.device, index_cache: dict | None = None,
               exact: bool = True) -> Tensor:
    """L2 norm of each parameter's grad as a float64 (P,) tensor on ``device``; 0 for a None grad.
    ``exact``: accumulated in float64, so finite gradients always have finite norms; else
    :func:`fast_norms` (an infinite norm must then be confirmed with ``exact``)."""
    grads = present_grads(params)
    return per_param(params, (float64_norms if exact else fast_norms)(grads), device, torch.float64, index_cache)


__all__ = ["grad_norms", "per_param", "present_grads"]
