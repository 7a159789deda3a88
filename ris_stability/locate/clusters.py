"""Is the loss invariant inside the tied clusters of an eigh/svd? Measured on the gradient that reaches it.

A loss that does not distinguish vectors inside a cluster of tied eigenvalues (singular values) sends a
gradient whose cluster blocks of skew(V^H g_V) vanish: the gap-aware backward is then exact. Node
pre-hooks on torch's eigh/svd backward nodes measure the fraction of that gradient inside the clusters,
before the node divides by the zero gaps (the "leak": 0 for an invariant loss, up to rounding). Clusters
follow THE tie rule (ris_stability.spectral.tie_rtol); for svd the null space (s_i + s_j tied with 0)
is a cluster too, and a tall/wide factor's complement counts with it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ris_stability.observe.guard import guarded
from ris_stability.spectral import tie_rtol

LEAK_KEY = "cluster_leak"


def _skew(x: Tensor) -> Tensor:
    return x - x.mH


def _ratio(inside: Tensor, total: Tensor) -> float:
    inside, total = float(inside), float(total)
    return inside / total if total > 0 else 0.0


def _eigh_leak(L: Tensor, V: Tensor, gV: Tensor) -> float:
    skew = _skew(V.mH @ gV)
    scale = L.abs().amax(-1, keepdim=True)
    tau = tie_rtol(L.shape[-1], L.dtype) * scale
    tied = (L.unsqueeze(-1) - L.unsqueeze(-2)).abs() <= tau.unsqueeze(-1)
    return _ratio(skew.abs().square().masked_fill(~tied, 0).sum().sqrt(), skew.abs().square().sum().sqrt())


def _svd_leak(U: Tensor, S: Tensor, Vh: Tensor, gU: Tensor | None, gVh: Tensor | None) -> float:
    k = S.shape[-1]
    U, Vh = U[..., :k], Vh[..., :k, :]
    scale = S.amax(-1, keepdim=True).unsqueeze(-1)
    tau = tie_rtol(max(U.shape[-2], Vh.shape[-1]), S.dtype) * scale
    diff = (S.unsqueeze(-1) - S.unsqueeze(-2)).abs()
    summ = S.unsqueeze(-1) + S.unsqueeze(-2)
    tied = (diff <= tau) | (summ <= tau)
    null = S <= tau.squeeze(-1)
    inside, total = S.new_zeros(()), S.new_zeros(())
    for factor, grad, cols in ((U, gU, True), (Vh.mH, gVh.mH if gVh is not None else None, False)):
        if grad is None:
            continue
        grad = grad[..., :k]
        block = _skew(factor.mH @ grad).abs().square()
        rest = (grad - factor @ (factor.mH @ grad)).abs().square().sum(-2)  # complement of a tall factor
        inside = inside + block.masked_fill(~tied, 0).sum() + rest.masked_fill(~null, 0).sum()
        total = total + block.sum() + rest.sum()
    return _ratio(inside.sqrt(), total.sqrt())


def _hook_eigh(node, store: dict) -> Any:
    L, V = node._saved_eigenvalues, node._saved_eigenvectors

    @guarded("locator")
    def measure(grad_outputs):
        gV = grad_outputs[1] if len(grad_outputs) > 1 else None
        if gV is not None and V.numel():
            with torch.no_grad():
                store[node] = _eigh_leak(L, V, gV)
    return node.register_prehook(measure)


def _hook_svd(node, store: dict) -> Any:
    U, S, Vh = node._saved_U, node._saved_S, node._saved_Vh

    @guarded("locator")
    def measure(grad_outputs):
        gU, _, gVh = (tuple(grad_outputs) + (None, None, None))[:3]  # outputs (U, S, Vh)
        if (gU is not None or gVh is not None) and S.numel():
            with torch.no_grad():
                store[node] = _svd_leak(U, S, Vh, gU, gVh)
    return node.register_prehook(measure)


CLUSTER_HOOKS: dict[str, Callable[[Any, dict], Any]] = {"LinalgEighBackward0": _hook_eigh,
                                                        "LinalgSvdBackward0": _hook_svd}
