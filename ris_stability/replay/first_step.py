"""`risdiag locate` when the first bad step is step 0.

The step driver knows the model only at the first ``optimizer.step()``, after step 0's forward and backward,
so it cannot arm the locator for step 0. Here the locator is armed at the first top-level module call with
gradients on (the model's forward: its module is the root), told when backward starts, and asked for the
finding as soon as backward returns (the gradients as backward made them, before the script can sanitise or
clip them); the re-run ends there. The parameters and gradients are compared with the capsule's when the
module's names are the capsule's (a single root, as the trace names it).
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from ris_stability.attach.hooks import variable_name
from ris_stability.locate.armed import ArmedLocator
from ris_stability.records.capsule import state_digest
from ris_stability.replay.bisect import same_bits


class FirstStep:
    """Install with :meth:`install`, run the script, :meth:`remove` (also closes the locator). ``stop``: the
    exception that ends the re-run once step 0's backward has returned."""

    def __init__(self, rec: Any, result: Any, stop: type[BaseException]):
        self.rec, self.result, self.stop = rec, result, stop
        self.root: nn.Module | None = None
        self.armed: ArmedLocator | None = None
        self._handle: Any = None
        self._backward: Callable[..., Any] | None = None

    def install(self) -> "FirstStep":
        self._handle = register_module_forward_pre_hook(self._pre)
        original = self._backward = torch.autograd.backward

        def backward(tensors: Any, *args: Any, **kwargs: Any) -> None:
            if self.armed is None:
                return original(tensors, *args, **kwargs)
            loss = tensors if isinstance(tensors, torch.Tensor) else None
            self.armed.backward_started()
            try:
                original(tensors, *args, **kwargs)
            except Exception as exc:
                self.result.finding = self.armed.error(exc)
                raise
            self._finish(loss)
            raise self.stop

        backward.__wrapped__ = original  # type: ignore[attr-defined]
        torch.autograd.backward = backward
        return self

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self.root is not None or not torch.is_grad_enabled() or not any(True for _ in module.parameters()):
            return
        self.root = module
        name = variable_name(module, sys._getframe(1)) or type(module).__name__.lower()
        self.result.reached = True
        state = module.state_dict()
        cap = self.rec.capsule
        if cap is not None and set(state) == set(cap.model_state):  # the trace named the model as this root
            self.result.params_match = state_digest(state) == self.rec.digest
        self.armed = ArmedLocator({name: module}).__enter__()

    def _finish(self, loss: torch.Tensor | None) -> None:
        params = dict(self.root.named_parameters())
        self.result.steps_run = 1
        self.result.finding = self.armed.finish(loss, params.values())
        recorded = self.rec.losses.get(0)
        if loss is not None and recorded is not None and loss.numel() == 1:
            value = float(loss.detach())
            if not (value == recorded or (value != value and recorded != recorded)):
                self.result.diverged_at, self.result.divergence = 0, (
                    f"loss {value!r} in the re-run, {recorded!r} in the recorded run")
        cap = self.rec.capsule
        if cap is not None and cap.grads is not None and set(cap.grads) == {n for n, p in params.items()
                                                                              if p.grad is not None}:
            diffs = [f"gradient of {n} differs" for n, g in cap.grads.items() if not same_bits(params[n].grad, g)]
            self.result.grads_bit_exact, self.result.grad_differences = not diffs, diffs

    def remove(self) -> None:
        if self._backward is not None:
            torch.autograd.backward = self._backward
            self._backward = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        armed, self.armed = self.armed, None
        if armed is not None:
            armed.close()


__all__ = ["FirstStep"]
