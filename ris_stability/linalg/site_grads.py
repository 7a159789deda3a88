"""What backward hands a probe site's hooks, kept per step and measured together.

Three hooks per call: on the eigen/singular-vector outputs (did the loss use them: ``vec``), on the op's
autograd node (the gradient the call passes back to its matrix, times the matrix norm: the site's
contribution ``back``, for spike attribution), and for eig on its eigenvectors (the two parts of the eig
backward: ``eig_terms``). The hooks only keep detached references (no kernels, never altering a
gradient); :meth:`BackwardRecord.settle` measures the step's calls in a few fused kernels, so a site
called once per sample in a Python loop costs a handful of kernels per step, not a few per call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from ris_stability.numerics.norms import float64_norms, norm64
from ris_stability.numerics.stats import eig_backward_terms
from ris_stability.observe.guard import guarded

_PART = "probe.backward_hooks"  # the guard's name for these hooks (one failure switches them all off)

_KEEP_NUMEL = 1 << 16  # larger gradients are reduced to their norm at once instead of kept


@dataclass
class BackwardRecord:
    vec: Tensor | None = None  # device bool: some vector output received a non-zero (or NaN) gradient
    # device float64: sum over calls of (||dL/dA|| * ||A||)^2, the gradient each call passed back to its
    # matrix in units of that matrix (unchanged when the matrix is rescaled): the site's contribution.
    back: Tensor | None = None
    # device float64 maxima over the calls of an eig site's backward parts (numerics.stats.eig_backward_terms)
    eig_terms: dict[str, Tensor] = field(default_factory=dict)
    _vec_grads: list[Tensor] = field(default_factory=list)
    _back: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    _eig: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)

    # The hooks are bound methods (and partials of them): one is made per observed call, and a closure
    # guarded per call would copy the function's metadata each time (most of a small call's hook cost).
    def vector_hook(self) -> Callable[[Tensor | None], None]:
        return self._on_vector_grad

    @guarded(_PART)
    def _on_vector_grad(self, grad: Tensor | None) -> None:
        # Called with None when the loss does not use this output; must never alter the gradient.
        if grad is not None:
            self._vec_grads.append(grad.detach() if grad.numel() <= _KEEP_NUMEL else norm64(grad))
        return None

    def backward_hook(self, matrix: Tensor) -> Callable:
        """Hook for the op's autograd node; ``matrix``: the op's (detached) input, whose norm scales the
        gradient it receives (kept by reference when small and measured in :meth:`settle` with the others)."""
        return partial(self._on_node_grad, matrix if matrix.numel() <= _KEEP_NUMEL else norm64(matrix))

    @guarded(_PART)
    def _on_node_grad(self, scale: Tensor, grad_inputs, grad_outputs) -> None:
        g = grad_inputs[0] if grad_inputs else None
        if g is not None:
            self._back.append((g.detach() if g.numel() <= _KEEP_NUMEL else norm64(g), scale))

    def eig_hook(self, w: Tensor, V: Tensor) -> Callable[[Tensor], None]:
        return partial(self._on_eigvec_grad, w, V)

    @guarded(_PART)
    def _on_eigvec_grad(self, w: Tensor, V: Tensor, gV: Tensor | None) -> None:
        # None when the loss uses only the eigenvalues (ESPRIT's rotation eig): no eigenvector terms
        if gV is None:
            return None
        self._eig.append((w, V, gV.detach().reshape(-1, *gV.shape[-2:])[: w.shape[0]]))

    @guarded(_PART)
    def settle(self) -> None:
        """Measure what the hooks kept: vec (any non-zero eigenvector gradient), back, eig_terms."""
        with torch.no_grad():
            if self._vec_grads:
                norms = torch.stack([n.to(self._vec_grads[0].device) for n in float64_norms(self._vec_grads)])
                received = (norms != 0).any()  # a positive norm or a NaN one (norms are never negative)
                self.vec = received if self.vec is None else self.vec | received.to(self.vec.device)
            if self._back:
                grads, scales = zip(*self._back)
                dev = grads[0].device
                sq = (torch.stack([n.to(dev) for n in float64_norms(list(grads))]) * torch.stack(
                    [x.to(dev) for x in float64_norms(list(scales))])).square().sum()
                self.back = sq if self.back is None else self.back + sq.to(self.back.device)
            for w, V, gV in _same_shapes(self._eig):
                noise, terms = eig_backward_terms(w, V, gV)
                for key, value in (("phase_noise", noise.amax()), ("gap_terms", terms.amax())):
                    old = self.eig_terms.get(key)
                    self.eig_terms[key] = value if old is None else torch.maximum(old, value.to(old.device))
        self._vec_grads, self._back, self._eig = [], [], []


def _same_shapes(calls: list[tuple[Tensor, ...]]) -> list[tuple[Tensor, ...]]:
    """Calls grouped by shapes and device, each group's tensors concatenated along dim 0."""
    groups: dict[tuple, list[tuple[Tensor, ...]]] = {}
    for call in calls:
        groups.setdefault(tuple((t.shape[1:], t.device) for t in call), []).append(call)
    return [tuple(torch.cat(parts) for parts in zip(*members)) for members in groups.values()]
