"""Which norm calls are spectral: only matrix norms of order 2, -2 and 'nuc' depend on the singular values
in a way whose gradient can break (a tied top or bottom singular value, a zero one); a Frobenius or vector
norm has no spectral hazard and is frequent, so it is not recorded.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

SPECTRAL_ORDERS = (2, -2, "nuc")


def _arg(args: tuple, kwargs: dict, index: int, *names: str) -> Any:
    if len(args) > index:
        return args[index]
    return next((kwargs[n] for n in names if n in kwargs), None)


def matrix_order(args: tuple, kwargs: dict) -> bool:
    """The interception's cheap pre-test of a norm call: only orders 2, -2 and 'nuc' can be spectral
    (:func:`refine` decides)."""
    order = args[1] if len(args) > 1 else kwargs.get("ord", kwargs.get("p"))
    return order in SPECTRAL_ORDERS and not isinstance(order, bool)


def norm_kind(order: Any) -> str:
    """The kind a matrix norm of ``order`` is measured as ('norm_2', 'norm_-2', 'norm_nuc')."""
    return f"norm_{order}"


def refine(name: str, kind: str, args: tuple, kwargs: dict) -> tuple[str, str] | None:
    """(name, kind) to record for this call, or None when it has no spectral hazard (a Frobenius or vector
    norm). Ops other than norms pass unchanged."""
    if kind != "norm":
        return name, kind
    A = _arg(args, kwargs, 0, "A", "input")
    order = _arg(args, kwargs, 1, "ord", "p")
    dim = _arg(args, kwargs, 2, "dim")
    if not isinstance(A, Tensor) or A.dim() < 2 or isinstance(order, bool) or order not in SPECTRAL_ORDERS:
        return None
    matrix = (isinstance(dim, (tuple, list)) and len(dim) == 2) or (
        dim is None and (name == "linalg.matrix_norm" or A.dim() == 2))
    if not matrix or (name == "norm" and order != "nuc"):  # torch.norm(A, p=2): 2-norm of all entries
        return None
    return f"{name}(ord={order})", norm_kind(order)
