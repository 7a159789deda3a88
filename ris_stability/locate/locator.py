"""Find the first op whose output went non-finite from finite inputs, in forward or backward.

``Locator(roots=...).run(fn, *args, **kwargs)`` calls ``fn`` (which returns a scalar loss), then
computes the gradient of the loss w.r.t. every leaf tensor that requires grad (module parameters
included) with ``torch.autograd.grad``, so ``.grad`` attributes are left as they were. While it runs:

* a TorchDispatchMode checks every aten op's outputs. An op with a non-finite output and only finite
  inputs is an *origin*; an op that merely consumes a non-finite input passes the origin on ("taint",
  per tensor). The finding is the origin of the non-finite loss or gradient, not the last propagator;
* the module tracker (ris_stability.observe.tracker) names the innermost running nn.Module of each op;
* a TorchFunctionMode maps every autograd node created in forward to the module, source line and
  torch function that created it, and to the eigenvalues of an eigh/svd forward, so a backward op
  (running inside ``torch._C._current_autograd_node()``) is reported with its forward context;
* backward stops at the first node that returns NaN (the check ``detect_anomaly(check_nan=True)`` makes,
  made only at the nodes whose ops produced NaN), and a pre-hook per node names the node of a backward
  that raises.
Everything is removed on exit, also when ``fn`` raises. ``fn`` must not run backward itself.

Under any dispatch mode PyTorch skips the complex-phase checks of the eigh/svd backward, so the
locator restores them with node pre-hooks (same tolerances and messages). The answer for each phase:
"input" when an argument (or a root's parameter/buffer) already holds NaN/Inf before the call;
"error" when fn or the backward raises; else the origin of the non-finite loss ("forward") or of the
first non-finite gradient ("backward", or "forward" when a masked forward value leaked into it).

Module paths are relative to *roots*: ``Locator(roots={"model": m, "loss": l})`` names the loss's
submodule ``subspace`` "loss.subspace". ``locate_nonfinite(fn, *args, **kwargs)`` (no roots) finds
them itself: ``fn`` when it is a module or a bound method of one (root name ""), module arguments
(root name = parameter name, e.g. "model"), and modules in ``fn``'s closure (the variable name).
A module outside every root is named after the nearest named module that calls it, or its class.
The private dispatch-mode and autograd-node APIs it needs are listed in the package docstring.

This file is the run driver (install, forward, backward, the finding); the dispatch mode and taint
tracking are in ``taint.py``, the function mode and node contexts in ``nodes.py``.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ris_stability.observe.frames import MAX_STACK, traceback_stack as _traceback_stack, user_stack
from ris_stability.locate.causes import Observation, explain
from ris_stability.locate.finding import Finding, TensorSummary
from ris_stability.locate.inputs import (LocatorUsageError, _check_loss, _graph_leaves, _input_finding,
                                         bind_arguments, discover_roots, find_nonfinite)
from ris_stability.locate.nodes import _ForwardRecorder, _NodeRecorder
from ris_stability.locate.ops import _finite, _spectral_stats, culprit_values, op_name
from ris_stability.locate.phase import EIGH_PHASE_MESSAGE, SVD_PHASE_MESSAGE
from ris_stability.locate.stack import _Context
from ris_stability.observe.tracker import ModuleTracker
from ris_stability.locate.taint import BackwardStopped, _DispatchChecks, _NonFiniteMode, _Origin

__all__ = ["EIGH_PHASE_MESSAGE", "Locator", "LocatorUsageError", "MAX_STACK", "SVD_PHASE_MESSAGE",
           "bind_arguments", "culprit_values", "discover_roots", "find_nonfinite", "locate_nonfinite",
           "op_name", "user_stack"]

logger = logging.getLogger(__name__)

_ANOMALY_NODE = re.compile(r"Error detected in (\w+)")


class _Session(_DispatchChecks, _NodeRecorder):
    """One locator run: the dispatch checks (taint, origins) and the node contexts, installed together."""

    def __init__(self, modules: ModuleTracker):
        _DispatchChecks.__init__(self, modules)
        _NodeRecorder.__init__(self)
        self.caught: list = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            self.caught = stack.enter_context(warnings.catch_warnings(record=True, action="always"))
            stack.callback(self._remove_node_hooks)
            stack.callback(self.remove_stops)
            stack.enter_context(_NonFiniteMode(self))
            yield


    def execute(self, fn: Callable, args: tuple, kwargs: dict) -> Finding | None:
        try:
            with self.installed():
                return self._run(fn, args, kwargs)
        finally:
            self._replay_warnings()

    def _run(self, fn: Callable, args: tuple, kwargs: dict) -> Finding | None:
        try:
            with _ForwardRecorder(self):
                loss = fn(*args, **kwargs)
        except Exception as exc:
            return self._error_finding(exc)
        _check_loss(loss)
        with self.paused():
            if not _finite(loss):
                return self._finding(self._origin_of([loss]), "the loss itself is non-finite")
        leaves = _graph_leaves(loss)
        if not leaves:
            return None
        self.phase, self.stop_at_nan = "backward", True
        try:
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        except BackwardStopped as stop:
            with self.paused():
                return self._finding(self.last_bad, f"backward stopped at {stop.node}, the first node to return NaN")
        except Exception as exc:
            return self._error_finding(exc)
        finally:
            self.stop_at_nan = False
        with self.paused():
            bad = [g for g in grads if g is not None and not _finite(g)]
            if not bad:
                return None
            return self._finding(self._origin_of(bad), f"{len(bad)} of {len(leaves)} gradients are non-finite")

    def _origin_of(self, tensors: list[Tensor]) -> _Origin:
        origin = next((o for o in map(self.origin_of, tensors) if o is not None), None)
        if origin is None:  # masks are the last resort: an origin that made NaN comes first
            ranked = sorted(self.origins, key=lambda o: o.intentional)
            origin = next((o for o in ranked if o.phase == self.phase), None)
        if origin is None:  # produced by no op we saw: it came from outside, e.g. a global tensor
            t = tensors[0]
            origin = _Origin("input", "", "", _Context(), (TensorSummary.of("value", t),),
                             TensorSummary.of("output", t))
        return origin

    def _finding(self, origin: _Origin, note: str = "", message: str = "") -> Finding:
        if origin.phase == "forward" and self.phase == "backward":
            note = ("the loss was finite: a non-finite forward value that was masked in the loss reached "
                    f"the gradients through backward; {note}")
        obs = Observation(phase=origin.phase, op=origin.op, node=origin.node, function=origin.ctx.function,
                          location=origin.ctx.location, inputs=origin.inputs, output=origin.output,
                          culprit=origin.culprit, message=message, context=origin.context,
                          intentional=origin.intentional)
        cause = explain(obs)
        return Finding(phase=origin.phase, cause=cause.text, op=origin.op, node=origin.node,
                       module=origin.ctx.module, location=origin.ctx.location, stack=origin.ctx.stack,
                       function=origin.ctx.function,
                       inputs=origin.inputs, output=origin.output, culprit=origin.culprit_text,
                       remedies=cause.remedies, message=message or note, context=origin.context)

    def _error_finding(self, exc: Exception) -> Finding:
        with self.paused():
            return self._error_finding_unpaused(exc)

    def _error_finding_unpaused(self, exc: Exception) -> Finding:
        if self.error is not None and _in_chain(exc, self.error[0]):
            origin = self.error[1]
            if self.symptom_of is not None:
                raised = origin.op or origin.ctx.function or "a later op"
                where = f" ({origin.ctx.location})" if origin.ctx.location else ""
                return self._finding(self.symptom_of, message=(
                    f"{raised}{where} later raised on this non-finite value: {str(exc).strip().splitlines()[0]}"))
        elif self.phase == "backward":
            node = self._raising_node()
            ctx = (self.nodes.get(node) if node is not None else None) or _Context()
            inputs = ()
            if ctx.spectrum is not None:
                kind, values = ctx.spectrum
                inputs = (TensorSummary.of(f"{kind} values of the forward {ctx.function or kind}", values,
                                           _spectral_stats(kind, values)),)
            origin = _Origin("error", ctx.op, node.name() if node is not None else "", ctx, inputs)
        else:
            origin = _Origin("error", "", "", _Context(self.modules.of_traceback(exc.__traceback__), _traceback_stack(exc), ""))
        return self._finding(origin, message=str(exc))

    def _raising_node(self):
        """The node that raised in backward: the last one entered (its pre-hook), else the last the dispatch
        mode saw running an op."""
        return self.running_node if self.running_node is not None else self.last_node

    def _replay_warnings(self) -> None:
        for w in self.caught:
            text = str(w.message)
            if "Anomaly Detection has been enabled" in text or _ANOMALY_NODE.search(text):
                continue
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _in_chain(exc: BaseException, target: BaseException) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if exc is target:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class Locator:
    """Run a loss function and its backward under the locator; see the module docstring.

    ``roots``: name -> module used for module paths and scanned for non-finite parameters/buffers;
    None discovers them from ``fn`` and its arguments. The run happens in ``run``; a Locator holds no
    state between runs and can be reused.
    """

    def __init__(self, roots: Mapping[str, nn.Module] | None = None):
        self.roots = None if roots is None else dict(roots)

    def run(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Finding | None:
        named_args = bind_arguments(fn, args, kwargs)
        roots = discover_roots(fn, named_args) if self.roots is None else self.roots
        scanned: set[int] = set()
        for name, value in list(roots.items()) + named_args:
            found = find_nonfinite(value, name, scanned)
            if found is not None:
                logger.info("locator: argument %s holds non-finite values before the call", found[0])
                return _input_finding(*found)
        return _Session(ModuleTracker(roots)).execute(fn, args, kwargs)


def locate_nonfinite(fn: Callable, /, *args: Any, **kwargs: Any) -> Finding | None:
    """``fn(*args, **kwargs)`` -> scalar loss; its gradients are computed too. None when the loss and
    every gradient are finite, else the :class:`Finding` of the first origin. Roots are discovered
    (``Locator(roots=...).run`` to name them yourself)."""
    return Locator().run(fn, *args, **kwargs)
