"""What the step driver reads from a loop it does not own: the optimizer's parameters, one module holding the
roots and every trained parameter, the learning rate, and a capsule's copy of the roots' forward inputs."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def model_of(roots: Mapping[str, nn.Module], params: list[Tensor]) -> nn.Module:
    """One module holding every root and every optimizer parameter no root owns (by reference: the
    user's modules and parameters are registered in a new container, never changed)."""
    owned = {id(p) for m in roots.values() for p in m.parameters()}
    loose = [p for p in params if id(p) not in owned]
    if len(roots) == 1 and not loose:
        return next(iter(roots.values()))
    holder = nn.ModuleDict(dict(roots))
    if loose:
        holder["params"] = nn.ParameterList(loose)
    return holder


def _detached(value: Any, depth: int = 0) -> Any:
    """Capsule-safe copy of forward inputs: tensors detached and cloned, containers kept, anything
    else by its repr (capsules load with weights_only=True)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if depth > 6:
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): _detached(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_detached(v, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def batch_state(batch: Any) -> dict[str, Any]:
    """What a capsule of a script run holds as its batch: each root's first forward inputs of the step."""
    return {"inputs": _detached(batch or {})}


def _lr(optimizer: Any) -> float:
    if isinstance(optimizer, (list, tuple)):
        optimizer = optimizer[0] if optimizer else None
    if optimizer is None or not optimizer.param_groups:
        return math.nan
    lr = optimizer.param_groups[0].get("lr", math.nan)
    return float(lr) if isinstance(lr, (int, float)) else math.nan


__all__ = ["batch_state", "model_of", "optimizer_params"]
