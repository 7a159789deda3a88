"""The gradient monitor's block layout: its column names (module keys, param-group names) and where each
squared norm lands in the one scatter-add that sums them (instruments/grads.py builds the block)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

TOTAL_KEY = "_total"


def as_list(optimizer: Any) -> list:
    """One optimizer, a sequence of them, or None, as a list."""
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


def module_key(param_name: str, depth: int) -> str:
    """Module a parameter is grouped under: the first ``depth`` components of its module path
    (``heads.angle.weight`` -> ``heads`` at depth 1, ``heads.angle`` at depth 2 and deeper); a
    parameter registered directly on the root keeps its own name."""
    parts = param_name.split(".")
    return ".".join(parts[: min(depth, len(parts) - 1)]) or parts[-1]


def group_name(index: int, group: Mapping) -> str:
    """Name of an optimizer param group: its ``"name"`` entry if it has one, else its index."""
    return str(group.get("name", index))


def group_key(k: int, g: int, group: Mapping, n_optimizers: int) -> str:
    """A param group's column name: its group name, prefixed by the optimizer's index when there are several."""
    name = group_name(g, group)
    return name if n_optimizers == 1 else f"{k}.{name}"


def segments(module_of: Sequence[int], modules: int, position: Mapping[int, int],
             layout: tuple[tuple[int, ...], ...], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(source, slot, number of slots) of the block's scatter-add. Sources index [grad norms (P), parameter
    norms (P)] of the P parameters, ``module_of[i]`` the module of parameter i among ``modules``; ``layout``
    holds the parameter ids of each param group, ``position`` maps an id to its parameter index (ids of
    unmonitored parameters are skipped). Slots follow the block's keys: grad per module, grad total, one per
    group, param per module, param total."""
    count = len(module_of)
    source: list[int] = []
    slot: list[int] = []
    for i, m in enumerate(module_of):
        source += [i, i]
        slot += [m, modules]
    for g, ids in enumerate(layout):
        members = [position[pid] for pid in ids if pid in position]
        source += members
        slot += [modules + 1 + g] * len(members)
    base = modules + 1 + len(layout)
    for i, m in enumerate(module_of):
        source += [count + i, count + i]
        slot += [base + m, base + modules]
    return (torch.tensor(source, dtype=torch.long, device=device), torch.tensor(slot, dtype=torch.long, device=device),
            base + modules + 1)


__all__ = ["TOTAL_KEY", "as_list", "group_key", "group_name", "module_key", "segments"]
