"""Intentional infinities: a mask's ``-inf`` is not a fault; the NaN it later turns into is.

Attention code writes ``-inf`` on purpose (``masked_fill(~mask, -inf)``, ``where(mask, x, -inf)``, an
additive mask argument holding ``-inf``). Such an origin is *intentional*: its infinities were supplied
(a non-finite constant, or an argument whose only non-finite entries are ``-inf``), not computed. The
locator keeps it as context and reports the first op that turns those infinities into NaN (softmax over
a fully masked row, ``-inf - -inf``, ``0 * inf``) as the origin; an intentional ``-inf`` that reaches the
loss or the gradients unchanged is reported itself.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

_ROW_OPS = frozenset({"_softmax", "softmax", "_log_softmax", "log_softmax", "logsumexp"})


def _scalars(args: Iterable[Any]) -> Iterable[float]:
    for a in args:
        if isinstance(a, float):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _scalars(a)


def supplies_inf(args: tuple, kwargs: dict) -> bool:
    """True when an op was handed an infinite Python constant (``masked_fill(m, -inf)``, ``full(-inf)``)."""
    return any(math.isinf(v) for v in _scalars(list(args) + list(kwargs.values())))


def only_neg_inf(t: Tensor) -> bool:
    """True for a floating tensor whose non-finite entries are all ``-inf`` (an additive mask)."""
    with torch.no_grad():
        bad = ~torch.isfinite(t)
        return bool(bad.any()) and bool((t[bad] == -math.inf).all())


def has_nan(tensors: Iterable[Tensor]) -> bool:
    with torch.no_grad():
        return any(bool(torch.isnan(t).any()) for t in tensors if t.is_floating_point() or t.is_complex())


def row_culprit(packet_name: str, args: tuple, bad: Tensor) -> tuple[tuple | None, str]:
    """For a softmax-like op: the input row (along ``dim``) behind the first NaN of the output.

    Returns ``((row_max, row_min, n_neg_inf, n), text)``; a row whose max is ``-inf`` is entirely
    masked. (None, "") for other ops or when the row cannot be found."""
    if packet_name not in _ROW_OPS or not args or not isinstance(args[0], Tensor) or len(args) < 2:
        return None, ""
    x, dim = args[0].detach(), args[1]
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if not isinstance(dim, int) or bad.shape != x.shape:
        return None, ""
    with torch.no_grad():
        nan = torch.isnan(bad)
        if not bool(nan.any()):
            return None, ""
        flat = int(nan.reshape(-1).nonzero()[0, 0])
        idx = [int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape)]
        dim = dim % x.dim()
        idx[dim] = slice(None)
        row = x[tuple(idx)]
        n_neg = int((row == -math.inf).sum())
        values = (float(row.max()), float(row.min()), n_neg, int(row.numel()))
    where = ", ".join(":" if isinstance(i, slice) else str(i) for i in idx)
    if n_neg == row.numel():
        text = f"row ({where}) of the input: all {row.numel()} entries are -inf -> NaN"
    else:
        text = f"row ({where}) of the input: max {values[0]!r}, min {values[1]!r}, {n_neg} of {row.numel()} -inf -> NaN"
    return values, text


def describe(op: str, function: str, location: str, module: str, external: bool) -> str:
    """One line naming where intentional infinities came from, for a finding's context."""
    if external:
        return (f"the infinite values came from a tensor holding only -inf (an additive mask or a mask constant), "
                f"first used by {op}")
    where = " ".join(x for x in (f"at {location}" if location else "", f"in {module}" if module else "") if x)
    call = f" ({function})" if function else ""
    return f"the mask values (-inf) were written on purpose by {op}{call} {where}".rstrip()
