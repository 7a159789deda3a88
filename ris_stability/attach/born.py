"""BornCheck: whether backward made a gradient non-finite, seen where it is born (before user code between backward
and ``optimizer.step`` can sanitise, clip or skip it), at no host read.

At the end of each backward: one screen value, finite when every gradient is, stays on the device and is read
with the step's verdict (monitor/step_reads.py). On CPU it is the sum of one flat copy of the gradients
(``numerics.norms.flat_copy``), kept until the step ends so that the non-finite parameters can be named even
after the script rewrote them; elsewhere (and for large or mixed gradients) per-parameter screen values
(``numerics.norms.finite_screen``: the exact peaks on an accelerator). A screen's overflow is ruled out on exact
peaks before a step is called bad. The gradients are kept by reference with their versions. On a bad step the copies of the
gradients as born come from those references, unless the script rewrote them in place since (``nan_to_num_``,
``clip_grad_norm_``): for that the first step keeps one copy (a copy, not a read). A script seen rewriting its
gradients in place gets the eager check while a fault lasts: after a non-finite step, every backward reads its
check and copies the gradients when one is non-finite, so that the capsules of the steps that follow hold the
gradients as born. Ordinary steps read nothing here; the first bad step after clean ones, in such a script, names
its non-finite parameters (from the peaks) without their values (``risdiag locate`` recomputes them).
"""
from __future__ import annotations

import logging
import math

from torch import Tensor, nn

from ris_stability.monitor.context import LoopContext
from ris_stability.numerics.norms import finite_screen, flat_copy, flat_sum, peak_magnitudes

log = logging.getLogger(__name__)


class BornCheck:
    """The step's at-backward check (see the module docstring); :meth:`reset` at every step end."""

    def __init__(self) -> None:
        self.eager = False  # read and copy at every backward: a rewriting script whose last step was non-finite
        self.rewrites = False  # the script rewrites its gradients in place between backward and optimizer.step
        self._learned = False  # the first checked step has shown whether it does
        self._first_copy: dict[int, Tensor] | None = None
        self.reset()

    def reset(self) -> None:
        self._copies: dict[int, Tensor] | None = None  # eager: id(param) -> gradient as born, when non-finite
        self._screen: Tensor | None = None  # device value of the step's backward calls: finite when their gradients are
        self._refs: list[tuple[Tensor, Tensor, int]] = []  # (param, grad, version) after the last backward
        self._peaks: Tensor | None = None  # per-parameter screen values of the last backward (no flat copy)
        self._flat: Tensor | None = None  # the last backward's gradients in one flat copy (the CPU screen)
        self._first_copy = None if self._learned else self._first_copy

    def after_backward(self, params: list[Tensor]) -> None:
        grads = [(p, g) for p in params if (g := p.grad) is not None]
        if not grads:
            return
        tensors = [g for _, g in grads]
        flat = flat_copy(tensors)
        if flat is not None:  # non-finite when one gradient is (or the sum overflows: confirmed on peaks)
            peaks, total = None, flat_sum(flat)
        else:
            peaks = finite_screen(tensors)
            total = peaks.sum()
        if self.eager and self._copies is None and not bool(peak_magnitudes(tensors).isfinite().all()):
            self._copies = {id(p): g.detach().clone() for p, g in grads}  # the first bad backward of the step
        if not self._learned:
            self._first_copy = {id(p): g.detach().clone() for p, g in grads}
        self._screen = total if self._screen is None else self._screen + total
        self._refs, self._peaks, self._flat = [(p, g, g._version) for p, g in grads], peaks, flat

    def into(self, c: LoopContext) -> None:
        """Hand the step's check to its context (before the monitor's verdict); then learn about the script."""
        if self._copies is not None:  # non-finite at backward, whatever the script did to them since
            c.born_grads = {n: self._copies[id(p)] for n, p in c.model.named_parameters() if id(p) in self._copies}
            c.grads_finite = False
        elif self._screen is not None:
            c.born_screen, c.born_grads_fn = self._screen, lambda: self._born_grads(c.model)
            c.born_covers = self._covers(c.params())

    def _covers(self, params: list[Tensor]) -> bool:
        """The last backward's screen covered every gradient of ``params`` as it is now (none replaced, none
        rewritten in place since, none added): the step's verdict needs no second screen."""
        if any(p.grad is not g or g._version != v for p, g, v in self._refs):
            return False
        return sum(p.grad is not None for p in params) == len(self._refs)

    def learn(self, bad: bool) -> None:
        """After a checked step (``bad``: it was non-finite): whether the script rewrites its gradients in place
        (seen at the first step), and so whether the next backward gets the eager check."""
        if self._refs and not self._learned:
            self._learned, self.rewrites = True, self.rewrites or self._rewritten()
        self.eager = self.rewrites and bad

    def _born_grads(self, model: nn.Module) -> tuple[list[str], dict[str, Tensor] | None]:
        """A bad step's gradients as born: the non-finite ones' names (one read), copies (None: rewritten since)."""
        names = {id(p): n for n, p in model.named_parameters()}
        rewritten = self._rewritten()
        # the screen's values, confirmed by exact peaks where the gradients as born are still there
        peaks = (self._screen_values() if rewritten else peak_magnitudes([g for _, g, _ in self._refs])).tolist()
        refs = [(p, g, peak) for (p, g, _), peak in zip(self._refs, peaks) if id(p) in names]
        bad = [names[id(p)] for p, _, peak in refs if not math.isfinite(peak)]
        if not rewritten:
            return bad, {names[id(p)]: g.detach().clone() for p, g, _ in refs}
        if not self.rewrites:
            log.info("the script rewrites gradients in place between backward and optimizer.step: while a fault "
                     "lasts the check at backward reads at every backward, to keep the gradients as born")
        self.rewrites = True
        copy = self._first_copy
        return bad, None if copy is None else {names[id(p)]: copy[id(p)] for p, _, _ in refs if id(p) in copy}

    def _screen_values(self) -> Tensor:
        """Per-parameter values of the last backward's screen, finite exactly where its gradients were."""
        if self._flat is None:
            return self._peaks
        return peak_magnitudes(list(self._flat.split([g.numel() for _, g, _ in self._refs])))

    def _rewritten(self) -> bool:
        return any(g._version != v for _, g, v in self._refs)


__all__ = ["BornCheck"]
