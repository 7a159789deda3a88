"""AutoAttach: find a training loop's model, steps and loss from outside, with global hooks only.

Installed while attached, all removed on exit:

* global optimizer step pre/post hooks (``torch.optim.optimizer.register_optimizer_step_*_hook``): the
  first optimizer that steps is followed; its steps delimit the training steps, its pre-hook is where
  gradients are checked (and hidden from the update to skip a non-finite step);
* ``torch.autograd.backward`` (which ``Tensor.backward`` calls) wrapped: the tensor it is called on is the
  loss (the sum over the backward calls of a step, e.g. under gradient accumulation);
* until the first optimizer step, global module forward hooks that note the modules called at top level
  (not from inside another module) and the variable name they are bound to in the calling frame. At the
  first step the *roots* are those of them owning the optimizer's parameters; from then on only a
  forward pre-hook on each root remains (the step starts at a root's first forward; its inputs are
  kept by reference for the capsule).

Per step this costs one Python call per root forward, per backward call and per optimizer step: no
per-op interception and no device sync beyond the monitor's own finiteness check.
"""
from __future__ import annotations

import logging
import sys
from types import FrameType
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ris_stability.monitor import distributed
from ris_stability.attach.driver import StepDriver
from ris_stability.attach.loop_parts import optimizer_params
from ris_stability.observe.frames import _is_user
from ris_stability.observe.guard import guarded, users_call

log = logging.getLogger(__name__)

HOOKS = "attach.hooks"  # the guard's part: these hooks' own work (the driver they feed is guarded too)


def variable_name(module: nn.Module, frame: FrameType | None, depth: int = 12) -> str | None:
    """The name a user frame binds ``module`` to (locals first, then globals), walking outwards."""
    f = frame
    while f is not None and depth > 0:
        if _is_user(f.f_code.co_filename):
            for scope in (f.f_locals, f.f_globals):
                for name, value in list(scope.items()):
                    if value is module and name.isidentifier() and not name.startswith("_") and name != "self":
                        return name
        f, depth = f.f_back, depth - 1
    return None


def _call_kwargs(frame: FrameType | None, depth: int = 3) -> dict[str, Any]:
    """The keyword arguments of the module call a global forward pre-hook fires in (torch hands such hooks
    the positional ones only): the ``kwargs`` local of ``Module._call_impl`` (or its inner function), so that
    a model called as ``model(x=x)`` has its inputs in step 0's capsule too. Read by reference, never changed."""
    while frame is not None and depth > 0:
        if frame.f_code.co_filename.endswith(("torch/nn/modules/module.py", "torch\\nn\\modules\\module.py")):
            kwargs = frame.f_locals.get("kwargs")
            return dict(kwargs) if isinstance(kwargs, dict) else {}
        frame, depth = frame.f_back, depth - 1
    return {}


class _Discovery:
    """Top-level module calls before the first optimizer step: candidates for the roots."""

    def __init__(self, driver: StepDriver):
        self.driver = driver
        self.depth = 0
        self.seen: dict[int, tuple[nn.Module, str]] = {}
        self._handles = [register_module_forward_pre_hook(self._pre),
                         register_module_forward_hook(self._post, always_call=True)]

    @guarded(HOOKS)
    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self.depth == 0 and id(module) not in self.seen:
            name = variable_name(module, sys._getframe(1)) or type(module).__name__.lower()
            self.seen[id(module)] = (module, name)
            self.driver.record_inputs(name, args, _call_kwargs(sys._getframe(1)))
        self.depth += 1

    @guarded(HOOKS)
    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.depth = max(0, self.depth - 1)

    def params(self) -> list[Tensor]:
        """Every parameter of the modules seen so far (before an optimizer is known)."""
        return [p for module, _ in self.seen.values() for p in module.parameters()]

    def roots(self, params: list[Tensor] | None = None) -> dict[str, nn.Module]:
        """The seen modules owning any of ``params`` (None: every seen module that has parameters)."""
        ids = {id(p) for p in params} if params is not None else None
        roots: dict[str, nn.Module] = {}
        for module, name in self.seen.values():
            if any(ids is None or id(p) in ids for p in module.parameters()):
                unique, i = name, 1
                while unique in roots:
                    i += 1
                    unique = f"{name}{i}"
                roots[unique] = module
        return roots

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class AutoAttach:
    """Drive ``driver`` from global hooks. ``roots``/``optimizer`` given (``watch``) skip discovery."""

    def __init__(self, driver: StepDriver, roots: Mapping[str, nn.Module] | None = None,
                 optimizer: torch.optim.Optimizer | None = None):
        self.driver = driver
        self.optimizer = optimizer
        self._given_roots = dict(roots) if roots is not None else None
        self._handles: list[Any] = []
        self._root_handles: list[Any] = []
        self._discovery: _Discovery | None = None
        self._backward = None
        self._early: distributed.RankWatch | None = None
        self.steps_seen = 0
        self._stepped = False
        self._candidate: torch.optim.Optimizer | None = None  # zero_grad was called on it before any step
        self._zero_grads: dict[type, Any] = {}  # the zero_grad methods wrapped while installed

    # -- lifecycle --------------------------------------------------------------------------------
    def install(self) -> "AutoAttach":
        try:
            return self._install()
        except BaseException:
            self.remove()
            raise

    def _install(self) -> "AutoAttach":
        self._handles = [register_optimizer_step_pre_hook(self._pre_step),
                         register_optimizer_step_post_hook(self._post_step)]
        self.driver.scalers.on_step = self._scaler_step
        original = torch.autograd.backward
        self._backward = original
        driver = self.driver

        def backward(tensors: Any, *args: Any, **kwargs: Any) -> None:
            loss = tensors if isinstance(tensors, Tensor) else None
            self._watch_early()
            driver.before_backward(loss)
            try:
                users_call(original, tensors, *args, **kwargs)
            except Exception as exc:
                driver.after_backward(loss, exc)
                raise
            driver.after_backward(loss)

        backward.__wrapped__ = original  # type: ignore[attr-defined]
        torch.autograd.backward = backward
        for cls in (torch.optim.Optimizer, nn.Module):
            self._wrap_zero_grad(cls)
        if self._given_roots is not None and self.optimizer is not None:
            self._attach(self._given_roots, self.optimizer)
        else:
            self._discovery = _Discovery(driver)
            driver.params_hint, driver.roots_hint = self._discovery.params, self._discovery.roots
        return self

    def _wrap_zero_grad(self, cls: type) -> None:
        """``zero_grad`` (optimizer or module, set_to_none either way) ends an iteration that backward began and
        the script did not step (its own gate): the step is checked and recorded as skipped, not merged into
        the next one. Gradient accumulation (no zero_grad between backward calls) stays one step."""
        original = cls.zero_grad
        self._zero_grads[cls] = original
        hooks = self

        def zero_grad(owner: Any, *args: Any, **kwargs: Any) -> Any:
            hooks._before_zero_grad(owner)
            return users_call(original, owner, *args, **kwargs)

        zero_grad.__wrapped__ = original  # type: ignore[attr-defined]
        cls.zero_grad = zero_grad

    @guarded(HOOKS)
    def _before_zero_grad(self, owner: Any) -> None:
        d = self.driver
        if isinstance(owner, torch.optim.Optimizer):
            if self.optimizer is None:
                self._candidate = owner
                if d.step_backwards:  # an iteration ran backward and no optimizer step: follow this one
                    self._follow(owner)
            if owner is not self.optimizer:
                return
        elif not d.attached or not any(owner is m for m in (d.ctx.model, *d.roots.values())):
            return
        if d.step_backwards:
            d.end_unstepped()

    def flush(self) -> None:
        """At the end of the run: an iteration that ran backward but never stepped is recorded (attaching to
        the optimizer zero_grad was called on, when none ever stepped). A loop with no torch.optim optimizer at
        all (a hand-written update) stays unattached: nothing says which parameters it trains."""
        d = self.driver
        if not d.step_backwards:
            return
        if self.optimizer is None and self._candidate is not None:
            self._follow(self._candidate)
        if d.attached:
            d.end_unstepped("the script skipped optimizer.step() (the last iteration of the run)", raise_stop=False)

    @guarded(HOOKS)
    def _watch_early(self) -> None:
        """Under torch.distributed, at the first backward before any optimizer step: watch the local
        gradients of the modules seen so far, so that the first step's originating rank is known too (the
        monitor attaches only at the first optimizer step, after DDP has averaged that step's gradients)."""
        if self.optimizer is not None or self._discovery is None or self._early is not None:
            return
        if not distributed.active() or not self._discovery.seen:
            return
        holder = nn.ModuleList([m for m, _ in self._discovery.seen.values()])  # references, nothing changed
        self._early = distributed.RankWatch()
        self._early.attach(holder, capture=not distributed.grads_are_bucket_views(holder), early=True)
        self.driver.monitor.early_watch = self._early

    def remove(self) -> None:
        if self.driver.scalers.on_step == self._scaler_step:
            self.driver.scalers.on_step = None
        if self._early is not None and self.driver.monitor.early_watch is self._early:  # never adopted
            self._early.detach()
            self.driver.monitor.early_watch = None
        self._early = None
        if self._backward is not None:
            torch.autograd.backward = self._backward
            self._backward = None
        for cls, original in self._zero_grads.items():
            cls.zero_grad = original
        self._zero_grads = {}
        self.driver.params_hint, self.driver.roots_hint = list, dict
        for h in self._handles + self._root_handles:
            h.remove()
        self._handles, self._root_handles = [], []
        if self._discovery is not None:
            self._discovery.remove()
            self._discovery = None

    # -- hooks ------------------------------------------------------------------------------------
    def _attach(self, roots: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.driver.attach(roots, optimizer)
        for name, root in roots.items():
            self._root_handles.append(root.register_forward_pre_hook(self._root_hook(name), with_kwargs=True))

    def _root_hook(self, name: str):
        driver = self.driver

        @guarded(HOOKS)
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if driver.in_step or torch.is_grad_enabled():  # an evaluation forward starts no step
                driver.record_inputs(name, args, kwargs)
                driver.start_step()
                driver.arm_pending()
        return hook

    @guarded(HOOKS)
    def _scaler_step(self, scaler: Any, optimizer: torch.optim.Optimizer) -> None:
        """After ``GradScaler.step``: an iteration whose gradients overflowed never called ``optimizer.step()``
        (the scaler skipped it), so its step is checked and ended here, as the scaler's routine skip."""
        if self.optimizer is None:
            self._follow(optimizer)
        if optimizer is not self.optimizer:
            return
        if not self._stepped:
            self.driver.before_optimizer_step()
            self.driver.after_optimizer_step()
        self._stepped = False

    @guarded(HOOKS)
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self.optimizer is None:
            self._follow(optimizer)
        if optimizer is not self.optimizer:
            return None
        self.steps_seen += 1
        self._stepped = True  # GradScaler.step let this iteration's optimizer step run
        self.driver.before_optimizer_step()
        return None

    def _follow(self, optimizer: torch.optim.Optimizer) -> None:
        """The first optimizer that steps is the one whose steps are the training steps."""
        if self.optimizer is None:
            params = optimizer_params(optimizer)
            roots = (self._given_roots if self._given_roots is not None
                     else self._discovery.roots(params) if self._discovery is not None else {})
            if self._discovery is not None:
                self._discovery.remove()
                self._discovery = None
            log.info("following optimizer %s; model roots: %s", type(optimizer).__name__,
                     ", ".join(f"{n} ({type(m).__name__})" for n, m in roots.items()) or "none (parameters only)")
            self._attach(roots, optimizer)

    @guarded(HOOKS)
    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if optimizer is self.optimizer:
            self.driver.after_optimizer_step()


__all__ = ["AutoAttach", "variable_name"]
