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
This is the only file of the toolkit that imports private torch APIs.
"""
from __future__ import annotations

import cmath
import contextlib
import dataclasses
import inspect
import logging
import math
import os
import re
import sys
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from ris_stability import linalg_stats
from ris_stability.causes import Observation, explain, is_linalg_op
from ris_stability.finding import Finding, TensorSummary

logger = logging.getLogger(__name__)

MAX_INPUT_SUMMARIES = 8  # an op such as cat can take hundreds of tensors; the first few say enough
MAX_ORIGINS = 64  # masked non-finite values (e.g. -inf attention masks) need not be kept beyond this
# Pre-op copies of in-place operands (to show the values an in-place op destroyed) above this size
# are skipped; only their finiteness is recorded.
MAX_INPLACE_COPY = 1 << 22
_SKIP_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)
_aten = torch.ops.aten
# Ops that return no new values: nothing to check.
_NO_VALUES = frozenset({_aten.resize_, _aten.set_, _aten._local_scalar_dense})
# Ops whose output does not depend on their inputs' values (uninitialised memory): a NaN in their
# output is their own (an "uninitialised memory was read" origin), whatever their input held.
_FRESH = frozenset({_aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided})
# In-place ops that overwrite ``self`` completely: its previous content is not an input.
_OVERWRITE = frozenset({_aten.copy_, _aten.fill_, _aten.zero_, _aten.normal_, _aten.uniform_, _aten.random_,
                        _aten.bernoulli_, _aten.exponential_, _aten.geometric_, _aten.log_normal_, _aten.cauchy_})
_SPECTRAL_OPS = {_aten._linalg_eigh: ("eigh", 0), _aten._linalg_svd: ("svd", 1)}
_CHECK_ERRORS = _aten._linalg_check_errors
# Bookkeeping ops that never name what the user computed.
_TRIVIAL = frozenset({_aten.detach, _aten.alias, _aten.lift_fresh, _aten.view, _aten._unsafe_view})
_ANOMALY_NAN = re.compile(r"Function '(\w+)' returned nan values")
_ANOMALY_NODE = re.compile(r"Error detected in (\w+)")


class LocatorUsageError(TypeError):
    """``fn`` did not return a scalar loss tensor."""


@dataclasses.dataclass
class _Context:
    """Forward context of an op or of the autograd node it created."""

    module: str = ""
    stack: tuple[str, ...] = ()  # user frames "file.py:LINE", innermost first
    function: str = ""
    op: str = ""
    spectrum: tuple[str, Tensor] | None = None  # ("eigh"|"svd", values) of the forward decomposition

    @property
    def location(self) -> str:
        return self.stack[0] if self.stack else ""


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


def op_name(func) -> str:
    """'aten.div.Tensor', 'aten.log' (the '.default' overload is dropped)."""
    name = str(func)
    return name[: -len(".default")] if name.endswith(".default") else name


def _finite(t: Tensor) -> bool:
    # A sum is finite only if every entry is (one NaN/Inf poisons it) and costs a fraction of an
    # elementwise isfinite; an overflowing sum of finite entries falls through to the exact test.
    with torch.no_grad():
        if t.numel() == 0:
            return True
        total = t.detach().sum().item()
        if cmath.isfinite(total) if isinstance(total, complex) else math.isfinite(total):
            return True
        return bool(torch.isfinite(t).all())


def _is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


def _short_path(filename: str) -> str:
    rel = os.path.relpath(filename)
    return filename if rel.startswith("..") else rel


MAX_STACK = 8  # user frames kept per op: enough to reach the model code from a helper


def _is_user(filename: str) -> bool:
    return not filename.startswith(_SKIP_DIRS)


def user_stack(frame=None) -> tuple[str, ...]:
    """'file.py:LINE' of the frames outside torch and ris_stability, innermost first (the toolkit's
    own instruments may sit between the user's call and the op)."""
    f, out = (frame if frame is not None else sys._getframe(1)), []
    while f is not None and len(out) < MAX_STACK:
        if _is_user(f.f_code.co_filename):
            out.append(f"{_short_path(f.f_code.co_filename)}:{f.f_lineno}")
        f = f.f_back
    return tuple(out)


def _traceback_stack(exc: BaseException) -> tuple[str, ...]:
    tb, out = exc.__traceback__, []
    while tb is not None:
        if _is_user(tb.tb_frame.f_code.co_filename):
            out.append(f"{_short_path(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}")
        tb = tb.tb_next
    return tuple(reversed(out))[:MAX_STACK]


# --- module tracking -------------------------------------------------------------------------------
class _ModuleStack:
    """Stack of active modules from global forward hooks; names relative to the roots."""

    def __init__(self, roots: Mapping[str, nn.Module]):
        self._names: dict[int, tuple[nn.Module, str]] = {}
        for root_name, root in roots.items():
            for sub, m in root.named_modules():
                path = ".".join(p for p in (root_name, sub) if p)
                self._names.setdefault(id(m), (m, path))
        self.stack: list[nn.Module] = []
        self._handles: list = []

    def install(self) -> None:
        self._handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def name_of(self, m: nn.Module) -> str:
        return self._names[id(m)][1] if id(m) in self._names else type(m).__name__

    def _pre(self, module: nn.Module, args) -> None:
        if id(module) not in self._names:
            self._names[id(module)] = (module, self._unknown_name(module))
        self.stack.append(module)

    def _post(self, module: nn.Module, args, output) -> None:
        # Pop down to this module: entries left by an exception that was caught inside go too.
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is module:
                del self.stack[i:]
                return

    def _unknown_name(self, module: nn.Module) -> str:
        if not self.stack:
            return type(module).__name__
        parent = self.stack[-1]
        base = self.name_of(parent)
        rel = next((n for n, m in parent.named_modules() if m is module and n), type(module).__name__)
        return ".".join(p for p in (base, rel) if p)

    def current(self) -> str:
        return self.name_of(self.stack[-1]) if self.stack else ""


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


# --- per-op helpers ---------------------------------------------------------------------------------
_MUTATED: dict[Any, tuple[int, ...]] = {}


def _mutated_positions(func) -> tuple[int, ...]:
    """Positional arguments an op writes in place (``self`` of ``div_``), not ``out=`` buffers."""
    if func not in _MUTATED:
        _MUTATED[func] = tuple(i for i, a in enumerate(func._schema.arguments)
                               if a.alias_info is not None and a.alias_info.is_write and not a.kwarg_only)
    return _MUTATED[func]


_VIEWS: dict[Any, bool] = {}


def _is_view(func) -> bool:
    """An op whose outputs alias its input (view, slice, transpose ...): its values are a subset of
    the input's, so it cannot be an origin and its outputs inherit the input's origin unchecked."""
    if func not in _VIEWS:
        returns = func._schema.returns
        _VIEWS[func] = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                             for r in returns)
    return _VIEWS[func]


def _kw_writes(func) -> set[str]:
    return {a.name for a in func._schema.arguments if a.kwarg_only and a.alias_info is not None
            and a.alias_info.is_write}


def _named_inputs(func, args, kwargs, before: Mapping[int, Any]) -> list[tuple[str, Any]]:
    """(name, value) of the op's inputs; in-place operands as they were before the op (when a copy
    was kept); no out= buffers and no operand that the op overwrites whole."""
    schema_args = func._schema.arguments
    overwritten = _mutated_positions(func) if func.overloadpacket in _OVERWRITE else ()
    out: list[tuple[str, Any]] = []
    for i, value in enumerate(args):
        if i in overwritten:
            continue
        name = schema_args[i].name if i < len(schema_args) else f"arg{i}"
        value = before.get(i, value)
        if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
            out.extend((f"{name}[{j}]", v) for j, v in enumerate(value))
        else:
            out.append((name, value))
    writes = _kw_writes(func)
    out.extend((k, v) for k, v in kwargs.items() if k not in writes)
    return out


def culprit_values(func, inputs: list[tuple[str, Any]], bad: Tensor) -> tuple[tuple | None, str]:
    """Input values at the first non-finite element of a pointwise op's output (None otherwise)."""
    if torch.Tag.pointwise not in func.tags or bad.numel() == 0:
        return None, ""
    with torch.no_grad():
        flat = int((~torch.isfinite(bad)).reshape(-1).nonzero()[0, 0])
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape))
        values, parts = [], []
        for name, v in inputs:
            if isinstance(v, Tensor):
                try:
                    v = torch.broadcast_to(v.detach(), bad.shape)[idx].item()
                except RuntimeError:  # not broadcastable to the output: no single element to show
                    v = None
            elif not isinstance(v, (bool, int, float, complex)):
                v = None
            values.append(v)
            if v is not None:
                parts.append(f"{name}={v!r}")
        out_v = bad.detach()[idx].item()
    return tuple(values), f"at index {idx}: {', '.join(parts)} -> {out_v!r}"


def _spectral_stats(kind: str, values: Tensor, dtype=None) -> dict[str, float]:
    fn = linalg_stats.eigen_stats if kind == "eigh" else linalg_stats.singular_stats
    return linalg_stats.to_floats(linalg_stats.worst(fn(values.detach(), dtype=dtype)))


def _matrix_spectral(op: str, t: Any) -> dict[str, float]:
    """Spectral statistics of a finite square matrix input of a linear-algebra op, else {}."""
    if (not _is_float(t) or t.dim() < 2 or t.shape[-1] != t.shape[-2] or t.numel() == 0
            or not is_linalg_op(op) or not _finite(t)):
        return {}
    try:
        return linalg_stats.to_floats(linalg_stats.worst(linalg_stats.matrix_stats(t)))
    except torch.linalg.LinAlgError as exc:
        # The statistics' own eigvalsh failed on this input: report the op without them rather
        # than let the instrument's error pass for the user's.
        logger.warning("locator: no spectral statistics for an input of %s: %s", op, exc)
        return {}


# PyTorch skips its complex-phase checks in eigh/svd backward whenever a dispatch mode is active
# (they count as "tensor subclass like"), so the locator would silently let an ill-defined loss
# through. These node pre-hooks restore the same checks, with the same tolerances and messages.
_PHASE_RTOL = _PHASE_ATOL = 1e-2
EIGH_PHASE_MESSAGE = ("linalg_eigh_backward: The eigenvectors in the complex case are specified up to multiplication "
                      "by e^{i phi}. The specified loss function depends on this quantity, so it is ill-defined.")
SVD_PHASE_MESSAGE = ("svd_backward: The singular vectors in the complex case are specified up to multiplication "
                     "by e^{i phi}. The specified loss function depends on this phase term, making it ill-defined.")


def _imag_diag(X: Tensor) -> Tensor:
    return torch.imag(torch.diagonal(X, 0, -2, -1))


def _hook_eigh_phase(node):
    V = node._saved_eigenvectors
    if V is None or not V.is_complex():
        return None

    def check(grad_outputs):
        gV = grad_outputs[1] if len(grad_outputs) > 1 else None
        if gV is not None:
            d = _imag_diag(V.mH @ gV)
            if not torch.allclose(d, torch.zeros_like(d), rtol=_PHASE_RTOL, atol=_PHASE_ATOL):
                raise RuntimeError(EIGH_PHASE_MESSAGE)
    return node.register_prehook(check)


def _hook_svd_phase(node):
    U, Vh = node._saved_U, node._saved_Vh
    if U is None or not U.is_complex():
        return None

    def check(grad_outputs):
        _, gU, gVh = (tuple(grad_outputs) + (None, None, None))[:3]
        if gU is None and gVh is None:
            return
        # skew(X) = X - X^H doubles the imaginary part of the diagonal, as in torch's svd_backward.
        im_u = 2 * _imag_diag(U.mH @ gU) if gU is not None else torch.zeros_like(node._saved_S)
        im_v = 2 * _imag_diag(Vh @ gVh.mH) if gVh is not None else torch.zeros_like(node._saved_S)
        if not torch.allclose(im_u, -im_v, rtol=_PHASE_RTOL, atol=_PHASE_ATOL):
            raise RuntimeError(SVD_PHASE_MESSAGE)
    return node.register_prehook(check)


_PHASE_CHECKS = {"LinalgEighBackward0": _hook_eigh_phase, "LinalgSvdBackward0": _hook_svd_phase}


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _nonfinite_inputs(func, args, kwargs, pre_finite: Mapping[int, bool]) -> list[Tensor]:
    """The op's floating inputs that held a NaN/Inf before it ran (in-place operands judged by the
    finiteness recorded before the op)."""
    if func.overloadpacket in _FRESH:
        return []
    overwritten = _mutated_positions(func) if func.overloadpacket in _OVERWRITE else ()
    writes = _kw_writes(func)
    found: list[Tensor] = []
    for i, value in enumerate(args):
        if i in overwritten:
            continue
        if i in pre_finite:
            if not pre_finite[i]:
                found.append(value)
            continue
        found.extend(t for t in _tensors(value) if _is_float(t) and not _finite(t))
    for key, value in kwargs.items():
        if key not in writes:
            found.extend(t for t in _tensors(value) if _is_float(t) and not _finite(t))
    return found


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


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor):
        raise LocatorUsageError(
            f"locate_nonfinite: fn returned {type(loss).__name__}, expected a scalar loss tensor; "
            "wrap fn so that it returns the loss (e.g. lambda: step(batch)['loss'])")
    if loss.numel() != 1:
        raise LocatorUsageError(
            f"locate_nonfinite: fn returned a tensor of shape {tuple(loss.shape)}, expected a scalar loss; "
            "reduce it (e.g. .sum() or .mean()) inside fn")


def _graph_leaves(loss: Tensor) -> list[Tensor]:
    """Every leaf tensor requiring grad that the loss depends on, in graph order."""
    if loss.grad_fn is None:
        return [loss] if loss.requires_grad else []
    leaves, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaves.append(variable)
        stack.extend(nf for nf, _ in node.next_functions)
    return leaves


# --- arguments: names, roots, non-finite inputs ------------------------------------------------------
def bind_arguments(fn: Callable, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """(parameter name, value) of a call; positional fallbacks 'args[i]' when fn has no signature."""
    try:
        return list(inspect.signature(fn).bind(*args, **kwargs).arguments.items())
    except (TypeError, ValueError):
        return [(f"args[{i}]", a) for i, a in enumerate(args)] + list(kwargs.items())


def discover_roots(fn: Callable, named_args: list[tuple[str, Any]]) -> dict[str, nn.Module]:
    """Modules that name the module paths when no roots are given (see the module docstring)."""
    roots: dict[str, nn.Module] = {}
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        roots[""] = owner
    for name, value in named_args:
        if isinstance(value, nn.Module):
            roots.setdefault(name, value)
    code_fn = getattr(fn, "__func__", fn)
    code = getattr(code_fn, "__code__", None)
    for name, cell in zip(code.co_freevars if code else (), getattr(code_fn, "__closure__", None) or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # a closure variable not assigned yet
            continue
        if isinstance(value, nn.Module):
            roots.setdefault(name, value)
    return roots


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def find_nonfinite(value: Any, path: str, seen: set[int] | None = None,
                   depth: int = 0) -> tuple[str, str, Tensor] | None:
    """First (path, module path, tensor) holding NaN/Inf inside tensors, lists, tuples, dicts,
    dataclasses and modules (parameters and buffers)."""
    seen = set() if seen is None else seen
    if id(value) in seen or depth > 8:
        return None
    seen.add(id(value))
    if isinstance(value, Tensor):
        return (path, "", value) if _is_float(value) and not _finite(value) else None
    if isinstance(value, nn.Module):
        for name, t in list(value.named_parameters()) + list(value.named_buffers()):
            if _is_float(t) and not _finite(t):
                return _join(path, name), _join(path, name.rpartition(".")[0]), t
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, Mapping):
        items = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        items = [(f"{path}.{k}", v) for k, v in zip(value._fields, value)]
    elif isinstance(value, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for sub_path, sub in items:
        found = find_nonfinite(sub, sub_path, seen, depth + 1)
        if found is not None:
            return found
    return None


def _input_finding(path: str, module: str, t: Tensor) -> Finding:
    summary = TensorSummary.of(path or "fn", t)
    cause = explain(Observation(phase="input", location=path, inputs=(summary,)))
    return Finding(phase="input", cause=cause.text, module=module, location=path, inputs=(summary,),
                   remedies=cause.remedies)


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
