"""Find the first op whose output went non-finite from finite inputs, in forward or backward.

``Locator(roots=...).run(fn, *args, **kwargs)`` calls ``fn`` (which returns a scalar loss), then
computes the gradient of the loss w.r.t. every leaf tensor that requires grad (module parameters
included) with ``torch.autograd.grad``, so ``.grad`` attributes are left as they were. While it runs:

* a TorchDispatchMode checks every aten op's outputs. An op with a non-finite output and only finite
  inputs is an *origin*; an op that merely consumes a non-finite input passes the origin on ("taint",
  per tensor). The finding is the origin of the non-finite loss or gradient, not the last propagator;
* global module forward hooks keep the stack of active nn.Modules (innermost = the op's module);
* a TorchFunctionMode maps every autograd node created in forward to the module, source line and
  torch function that created it, and to the eigenvalues of an eigh/svd forward, so a backward op
  (running inside ``torch._C._current_autograd_node()``) is reported with its forward context;
* ``torch.autograd.detect_anomaly(check_nan=True)`` around backward stops at the first NaN node and
  names the node of a backward that raises.
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
Private dispatch-mode and autograd-node APIs are used in the locate subpackage only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from ris_stability.locate.causes import Observation, explain, is_linalg_op
from ris_stability.locate.finding import Finding, TensorSummary
from ris_stability.locate.inputs import (LocatorUsageError, _check_loss, _graph_leaves, _input_finding,
                                         bind_arguments, discover_roots, find_nonfinite)
from ris_stability.locate.ops import (_CHECK_ERRORS, _FRESH, _NO_VALUES, _OVERWRITE, _SPECTRAL_OPS, _TRIVIAL,
                                      _finite, _is_float, _is_view, _matrix_spectral, _mutated_positions,
                                      _named_inputs, _nonfinite_inputs, _spectral_stats, _tensors,
                                      culprit_values, op_name)
from ris_stability.locate.phase import _PHASE_CHECKS, EIGH_PHASE_MESSAGE, SVD_PHASE_MESSAGE
from ris_stability.frames import MAX_STACK, traceback_stack as _traceback_stack, user_stack
from ris_stability.locate.stack import _Context, _ModuleStack

__all__ = ["EIGH_PHASE_MESSAGE", "Locator", "LocatorUsageError", "MAX_STACK", "SVD_PHASE_MESSAGE",
           "bind_arguments", "culprit_values", "discover_roots", "find_nonfinite", "locate_nonfinite",
           "op_name", "user_stack"]

logger = logging.getLogger(__name__)

MAX_INPUT_SUMMARIES = 8  # an op such as cat can take hundreds of tensors; the first few say enough
MAX_ORIGINS = 64  # masked non-finite values (e.g. -inf attention masks) need not be kept beyond this
# Pre-op copies of in-place operands (to show the values an in-place op destroyed) above this size
# are skipped; only their finiteness is recorded.
MAX_INPLACE_COPY = 1 << 22
_ANOMALY_NAN = re.compile(r"Function '(\w+)' returned nan values")
_ANOMALY_NODE = re.compile(r"Error detected in (\w+)")


@dataclasses.dataclass
class _Origin:
    phase: str
    op: str
    node: str
    ctx: _Context
    inputs: tuple[TensorSummary, ...] = ()
    output: TensorSummary | None = None
    culprit: tuple | None = None
    culprit_text: str = ""



# --- the two modes ---------------------------------------------------------------------------------
class _NonFiniteMode(TorchDispatchMode):
    def __init__(self, session: "_Session"):
        super().__init__()
        self.session = session

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.session.dispatch(func, args, kwargs or {})


class _ForwardRecorder(TorchFunctionMode):
    def __init__(self, session: "_Session"):
        super().__init__()
        self.session = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        s = self.session
        outer, s.function = s.function, resolve_name(func) or getattr(func, "__name__", "")
        try:
            out = func(*args, **(kwargs or {}))
            s.register_nodes(out)
        finally:
            s.function = outer
        return out


# --- one run ----------------------------------------------------------------------------------------
class _Session:
    """State of one locator run: taint map, origins, node contexts, the first raising op."""

    def __init__(self, modules: _ModuleStack):
        self.modules = modules
        self.phase = "forward"
        self.function = ""
        self.taint = WeakTensorKeyDictionary()
        self.origins: list[_Origin] = []
        self.nodes: dict[Any, _Context | None] = {}
        # (kind, values, stack, module) of the last forward eigh/svd, until its autograd node shows up
        self.pending_spectrum: tuple[str, Tensor, tuple[str, ...], str] | None = None
        self.last_forward_op = ""
        self.last_linalg_op: tuple | None = None
        self.hook_handles: list = []
        self.is_paused = False
        self.last_node = None
        self.last_bad: _Origin | None = None
        self.error: tuple[BaseException, _Origin] | None = None
        self.symptom_of: _Origin | None = None  # first origin of the non-finite input an op raised on
        self.caught: list = []

    # -- dispatch-level checks
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The locator's own checks between forward and backward are not the user's ops."""
        was, self.is_paused = self.is_paused, True
        try:
            yield
        finally:
            self.is_paused = was

    def dispatch(self, func, args, kwargs):
        if self.is_paused:
            return func(*args, **kwargs)
        node = torch._C._current_autograd_node()
        if node is not None:
            self.last_node = node
        copies, pre_finite = self._before_inplace(func, args)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            self._record_error(func, args, kwargs, copies, exc)
            raise
        packet = func.overloadpacket
        if packet in _NO_VALUES:
            return out
        if self.phase == "forward" and packet not in _TRIVIAL:
            self.last_forward_op = op_name(func)
            if packet in _SPECTRAL_OPS:
                kind, index = _SPECTRAL_OPS[packet]
                self.pending_spectrum = (kind, out[index], user_stack(), self.modules.current())
        if is_linalg_op(str(func)):
            self.last_linalg_op = (func, args, kwargs)
        if _is_view(func):
            origin = next((o for o in map(self.taint.get, _tensors(args)) if o is not None), None)
            if origin is not None:
                for t in _tensors(out):
                    self.taint[t] = origin
            return out
        self._check(func, args, kwargs, out, copies, pre_finite)
        return out

    @staticmethod
    def _before_inplace(func, args) -> tuple[dict[int, Tensor], dict[int, bool]]:
        positions = _mutated_positions(func)
        if not positions or func.overloadpacket in _OVERWRITE:
            return {}, {}
        copies, finite = {}, {}
        for i in positions:
            if i < len(args) and _is_float(args[i]):
                finite[i] = _finite(args[i])
                if args[i].numel() <= MAX_INPLACE_COPY:
                    copies[i] = args[i].detach().clone()
        return copies, finite

    def _check(self, func, args, kwargs, out, copies, pre_finite) -> None:
        if func.overloadpacket in _FRESH:
            return  # uninitialised memory holds anything; it becomes a value only once an op writes it
        bad = [t for t in _tensors(out) if _is_float(t) and not _finite(t)]
        if not bad:
            return
        bad_in = _nonfinite_inputs(func, args, kwargs, pre_finite)
        origin = next((o for o in (self.taint.get(t) for t in bad_in) if o is not None), None)
        if origin is None:
            inputs = _named_inputs(func, args, kwargs, copies)
            origin = self._make_origin(func, inputs, bad[0], external=bool(bad_in))
            if len(self.origins) < MAX_ORIGINS:
                self.origins.append(origin)
        for t in bad:
            self.taint[t] = origin
        self.last_bad = origin

    def _context(self):
        """(phase, node name, forward context) of the op running now."""
        node = torch._C._current_autograd_node()  # set inside backward, also one that fn runs itself
        if node is not None:
            return "backward", node.name(), self.nodes.get(node) or _Context()
        if self.phase == "backward":
            return "backward", "", _Context()
        return "forward", "", _Context(self.modules.current(), user_stack(), self.function, "")

    def _make_origin(self, func, inputs, bad_out: Tensor | None, external: bool = False,
                     phase: str | None = None) -> _Origin:
        here, node, ctx = self._context()
        op = op_name(func)
        ctx = dataclasses.replace(ctx, op=op) if not node else ctx
        tensors = [(n, v) for n, v in inputs if isinstance(v, Tensor)]
        if external:  # show the tensor that brought the NaN in first
            tensors.sort(key=lambda nv: _is_float(nv[1]) and _finite(nv[1]))
        summaries = [TensorSummary.of(n, v, _matrix_spectral(op, v)) for n, v in tensors[:MAX_INPUT_SUMMARIES]]
        if node and ctx.spectrum is not None:
            kind, values = ctx.spectrum
            summaries.append(TensorSummary.of(f"{kind} values of the forward {ctx.function or kind}", values,
                                              _spectral_stats(kind, values)))
        culprit, text = (None, "")
        if bad_out is not None and func.overloadpacket not in _FRESH:
            culprit, text = culprit_values(func, inputs, bad_out)
        output = None if bad_out is None else TensorSummary.of("output", bad_out)
        phase = phase or ("input" if external else here)
        return _Origin(phase, op, node, ctx, tuple(summaries), output, culprit, text)

    def _record_error(self, func, args, kwargs, copies, exc: Exception) -> None:
        if func.overloadpacket is _CHECK_ERRORS and self.last_linalg_op is not None:
            # linalg ops raise from a separate checker op; blame the op whose result it checked.
            func, args, kwargs = self.last_linalg_op
            copies = {}
        self.error = (exc, self._make_origin(func, _named_inputs(func, args, kwargs, copies), None, phase="error"))
        bad_in = _nonfinite_inputs(func, args, kwargs, {})
        if bad_in:
            # The op raised because its input was already non-finite (eig/cholesky/svd refuse NaN/Inf):
            # that is a symptom; the finding is where the value first went non-finite.
            upstream = next((o for o in map(self.taint.get, bad_in) if o is not None), None)
            self.symptom_of = upstream or next(iter(self.origins), None)

    # -- forward node bookkeeping (called by _ForwardRecorder after each torch function)
    def register_nodes(self, out: Any) -> None:
        frontier = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
        new = []
        while frontier:
            node = frontier.pop()
            if node is None or node in self.nodes:
                continue
            self.nodes[node] = None
            new.append(node)
            frontier.extend(nf for nf, _ in node.next_functions)
        if not new:
            return
        ctx = _Context(self.modules.current(), user_stack(), self.function, self.last_forward_op)
        for node in new:
            if node.name() in _PHASE_CHECKS:
                self.hook_handles.append(_PHASE_CHECKS[node.name()](node))
            node_ctx = ctx
            forward_cls = getattr(node, "_forward_cls", None)
            if forward_cls is not None:  # a custom autograd.Function: apply() bypasses function modes
                node_ctx = dataclasses.replace(ctx, function=f"{forward_cls.__qualname__}.apply")
            name = node.name().lower()
            if self.pending_spectrum is not None and ("eigh" in name or "svd" in name):
                # The decomposition's own call site: for a custom autograd.Function the node is only
                # found when a later op consumes its output, possibly on another line.
                kind, values, stack, module = self.pending_spectrum
                node_ctx = dataclasses.replace(node_ctx, spectrum=(kind, values), stack=stack, module=module)
                self.pending_spectrum = None
            self.nodes[node] = node_ctx

    # -- the run
    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            self.caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            self.modules.install()
            stack.callback(self.modules.remove)
            stack.callback(self._remove_node_hooks)
            stack.enter_context(_NonFiniteMode(self))
            yield

    def _remove_node_hooks(self) -> None:
        for handle in self.hook_handles:
            if handle is not None:
                handle.remove()
        self.hook_handles = []

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
        self.phase = "backward"
        try:
            with torch.autograd.detect_anomaly(check_nan=True):
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        except Exception as exc:
            stopped = _ANOMALY_NAN.search(str(exc))
            if stopped is None or self.last_bad is None:
                return self._error_finding(exc)
            with self.paused():
                return self._finding(self.last_bad, f"detect_anomaly stopped backward at {stopped.group(1)}")
        with self.paused():
            bad = [g for g in grads if g is not None and not _finite(g)]
            if not bad:
                return None
            return self._finding(self._origin_of(bad), f"{len(bad)} of {len(leaves)} gradients are non-finite")

    def _origin_of(self, tensors: list[Tensor]) -> _Origin:
        origin = next((o for o in (self.taint.get(t) for t in tensors) if o is not None), None)
        if origin is None:
            origin = next((o for o in self.origins if o.phase == self.phase), None)
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
                          culprit=origin.culprit, message=message)
        cause = explain(obs)
        return Finding(phase=origin.phase, cause=cause.text, op=origin.op, node=origin.node,
                       module=origin.ctx.module, location=origin.ctx.location, stack=origin.ctx.stack,
                       function=origin.ctx.function,
                       inputs=origin.inputs, output=origin.output, culprit=origin.culprit_text,
                       remedies=cause.remedies, message=message or note)

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
            origin = _Origin("error", "", "", _Context(self.modules.current(), _traceback_stack(exc), ""))
        return self._finding(origin, message=str(exc))

    def _raising_node(self):
        """The node that raised in backward: anomaly mode names it, the dispatch mode saw it last."""
        named = [m.group(1) for w in self.caught for m in [_ANOMALY_NODE.search(str(w.message))] if m]
        if named and (self.last_node is None or self.last_node.name() != named[-1]):
            return next((n for n in self.nodes if n.name() == named[-1]), self.last_node)
        return self.last_node

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
        return _Session(_ModuleStack(roots)).execute(fn, args, kwargs)


def locate_nonfinite(fn: Callable, /, *args: Any, **kwargs: Any) -> Finding | None:
    """``fn(*args, **kwargs)`` -> scalar loss; its gradients are computed too. None when the loss and
    every gradient are finite, else the :class:`Finding` of the first origin. Roots are discovered
    (``Locator(roots=...).run`` to name them yourself)."""
    return Locator().run(fn, *args, **kwargs)
