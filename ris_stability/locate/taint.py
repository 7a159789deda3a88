"""The locator's dispatch mode: check every aten op's outputs and track which origin each tensor carries.

An op with a non-finite output and only finite inputs is an *origin*; an op that merely consumes a
non-finite input passes the origin on ("taint", per tensor), so the finding is the origin of a
non-finite loss or gradient, not the last op that propagated it. Views inherit their base's origin.
A value written in place through a view taints the view's base too, and a view without an origin of its
own reads its base's: buffers filled slice by slice (a DDP gradient bucket, a preallocated output) keep
the origin of what was written into them. An op that raises is recorded too (for linalg ops: the op
whose result the checker op rejected).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from ris_stability.observe import guard
from ris_stability.observe.frames import user_stack
from ris_stability.locate import masks
from ris_stability.locate.causes import is_linalg_op
from ris_stability.locate.clusters import LEAK_KEY
from ris_stability.locate.finding import TensorSummary
from ris_stability.locate.ops import (_CHECK_ERRORS, _FRESH, _NO_VALUES, _OVERWRITE, _PRESERVING, _SPECTRAL_OPS,
                                      _TRIVIAL, _finite, _is_float, _is_view, _matrix_spectral, _mutated_positions,
                                      _named_inputs, _nonfinite_inputs, _spectral_stats, _tensors,
                                      culprit_values, op_name)
from ris_stability.locate.stack import _Context
from ris_stability.observe.tracker import ModuleTracker

MAX_INPUT_SUMMARIES = 8  # an op such as cat can take hundreds of tensors; the first few say enough
MAX_ORIGINS = 64  # masked non-finite values (e.g. -inf attention masks) need not be kept beyond this
# Pre-op copies of in-place operands (to show the values an in-place op destroyed) above this size
# are skipped; only their finiteness is recorded.
MAX_INPLACE_COPY = 1 << 22

LOCATOR = "locator"  # the guard's part for the locator's modes and hooks


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
    intentional: bool = False  # infinities supplied on purpose (a mask), see locate/masks.py
    context: str = ""


class BackwardStopped(Exception):
    """Raised by the node hook of :attr:`_DispatchChecks.stop_at_nan`: ``node`` returned NaN."""

    def __init__(self, node: str):
        super().__init__(f"{node} returned NaN")
        self.node = node


class _NonFiniteMode(TorchDispatchMode):
    def __init__(self, checks: "_DispatchChecks"):
        super().__init__()
        self.checks = checks

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.checks.dispatch(func, args, kwargs or {})


class _DispatchChecks:
    """Dispatch-level part of a locator session: taint map, origins, the first raising op.

    ``_context()`` (the phase, node and forward context of the running op) comes from the node
    recorder that the session combines with this class.
    """

    def __init__(self, modules: ModuleTracker):
        self.modules = modules
        self.phase = "forward"
        self.taint = WeakTensorKeyDictionary()
        # Tensors whose every value was checked finite (an op's output) or is a copy of such values: an op
        # of _PRESERVING on them is not checked again (written non-finite later, a tensor carries an origin).
        self.checked = WeakTensorKeyDictionary()
        self.origins: list[_Origin] = []
        # (kind, values, stack, module) of the last forward eigh/svd, until its autograd node shows up
        self.pending_spectrum: tuple[str, Tensor, tuple[str, ...], str] | None = None
        self.last_forward_op = ""
        self.last_linalg_op: tuple | None = None
        self.is_paused = False
        self.last_node = None
        self.last_bad: _Origin | None = None
        self.error: tuple[BaseException, _Origin] | None = None
        self.symptom_of: _Origin | None = None  # first origin of the non-finite input an op raised on
        self.stop_at_nan = False  # backward ends at the first node that returns NaN (BackwardStopped)
        self._stops: dict[int, tuple] = {}  # id(node) -> (node, handle of its NaN check) (stop_at_nan)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The locator's own checks between forward and backward are not the user's ops."""
        was, self.is_paused = self.is_paused, True
        try:
            yield
        finally:
            self.is_paused = was

    def dispatch(self, func, args, kwargs):
        if self.is_paused or guard.is_off(LOCATOR):
            return func(*args, **kwargs)
        # Only the locator's own work is guarded: the op itself runs (and raises) exactly as the user's. The
        # guard is written out here rather than through guard.call: this runs for every aten op of the step.
        try:
            info, copies, pre_finite = self._prepare(func, args)
        except BaseException as exc:
            if guard.passes(exc):
                raise
            guard.record(LOCATOR, exc)
            return func(*args, **kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            guard.call(LOCATOR, self._record_error, func, args, kwargs, copies, exc)
            raise
        try:
            self._after(func, info, args, kwargs, out, copies, pre_finite)
        except BaseException as exc:
            if guard.passes(exc):
                raise
            guard.record(LOCATOR, exc)
        return out

    def _prepare(self, func, args) -> tuple:
        node = torch._C._current_autograd_node()
        if node is not None:
            self.last_node = node
        info = _info(func)
        return (info, *self._before_inplace(info, args))

    def _after(self, func, info, args, kwargs, out, copies, pre_finite) -> None:
        if info.no_values:
            return
        if self.phase == "forward" and not info.trivial:
            self.last_forward_op = info.name
            if info.spectral is not None:
                kind, index = info.spectral
                self.pending_spectrum = (kind, out[index], user_stack(), self.modules.current())
        if info.linalg:
            self.last_linalg_op = (func, args, kwargs)
        if info.view:
            if not self.origins:  # nothing non-finite yet: nothing to inherit
                return
            origin = next((o for o in map(self.origin_of, _tensors(args)) if o is not None), None)
            if origin is not None:
                for t in _tensors(out):
                    self.taint[t] = origin
            return
        if info.preserving and self._known_finite(args):
            for t in _tensors(out):
                self.checked[t] = True
            return
        self._check(func, args, kwargs, out, copies, pre_finite)

    def _known_finite(self, args) -> bool:
        """Every floating-point tensor among ``args`` (at least one) was checked finite and carries no origin
        (its base's check counts for a view)."""
        seen = False
        for t in _tensors(args):
            if not _is_float(t):
                continue
            if self.origin_of(t) is not None:
                return False
            if t not in self.checked and not (t._is_view() and t._base in self.checked):
                return False
            seen = True
        return seen

    @staticmethod
    def _before_inplace(info: "_OpInfo", args) -> tuple[dict[int, Tensor], dict[int, bool]]:
        positions = info.mutated
        if not positions or info.overwrite:
            return {}, {}
        copies, finite = {}, {}
        for i in positions:
            if i < len(args) and _is_float(args[i]):
                finite[i] = _finite(args[i])
                if args[i].numel() <= MAX_INPLACE_COPY:
                    copies[i] = args[i].detach().clone()
        return copies, finite

    def _check(self, func, args, kwargs, out, copies, pre_finite) -> None:
        if _info(func).fresh:
            return  # uninitialised memory holds anything; it becomes a value only once an op writes it
        outs = [t for t in _tensors(out) if _is_float(t)]
        bad = [t for t in outs if not _finite(t)]
        if not bad:
            for t in outs:
                self.checked[t] = True
            return
        bad_in = _nonfinite_inputs(func, args, kwargs, pre_finite)
        origin = next((o for o in map(self.origin_of, bad_in) if o is not None), None)
        inputs = None
        if origin is None:
            inputs = _named_inputs(func, args, kwargs, copies)
            origin = self._make_origin(func, inputs, bad[0], external=bool(bad_in))
            origin.intentional = (all(masks.only_neg_inf(t) for t in bad_in) if bad_in
                                  else masks.supplies_inf(args, kwargs)) and not masks.has_nan(bad)
            self._keep(origin)
        if origin.intentional and masks.has_nan(bad) and not masks.has_nan(bad_in):
            # A mask's infinities turned into NaN here: this op is the fault, the mask its context.
            inputs = inputs if inputs is not None else _named_inputs(func, args, kwargs, copies)
            nan_out = next(t for t in bad if masks.has_nan([t]))
            context = masks.describe(origin.op, origin.ctx.function, origin.ctx.location, origin.ctx.module,
                                     origin.phase == "input")
            origin = self._make_origin(func, inputs, nan_out)
            origin.context = context
            self._keep(origin)
        for t in bad:
            self.taint[t] = origin
            if t._is_view() and self.taint.get(t._base) is None:
                self.taint[t._base] = origin  # written through a view: the base holds the value now
        self.last_bad = origin
        if self.stop_at_nan and masks.has_nan(bad):
            self._check_node_returns()

    def _check_node_returns(self) -> None:
        """An op of the running backward node made NaN: once that node returns, stop backward if what it
        returns holds NaN (what ``detect_anomaly(check_nan=True)`` checks at every node, here only at the
        nodes whose ops made NaN: a NaN masked inside its node does not stop it)."""
        node = torch._C._current_autograd_node()
        if node is None or id(node) in self._stops:
            return
        # the node itself is kept with its handle: a freed node's id could name another node
        self._stops[id(node)] = (node, node.register_hook(functools.partial(self._node_returned, node.name())))

    def _node_returned(self, name: str, grad_inputs: tuple, grad_outputs: tuple) -> None:
        with self.paused():
            if masks.has_nan([g for g in grad_inputs if isinstance(g, Tensor)]):
                raise BackwardStopped(name)

    def remove_stops(self) -> None:
        for _, handle in self._stops.values():
            handle.remove()
        self._stops = {}

    def origin_of(self, t: Tensor) -> _Origin | None:
        """The origin a tensor carries: its own, else (a view) its base's."""
        origin = self.taint.get(t)
        if origin is None and t._is_view():
            origin = self.taint.get(t._base)
        return origin

    def _keep(self, origin: _Origin) -> None:
        if len(self.origins) < MAX_ORIGINS:
            self.origins.append(origin)

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
            stats = _spectral_stats(kind, values)
            leak = self.cluster_leaks.get(torch._C._current_autograd_node())
            if leak is not None:
                stats[LEAK_KEY] = leak
            summaries.append(TensorSummary.of(f"{kind} values of the forward {ctx.function or kind}", values, stats))
        culprit, text = (None, "")
        if bad_out is not None and func.overloadpacket not in _FRESH:
            culprit, text = culprit_values(func, inputs, bad_out)
            if culprit is None:
                culprit, text = masks.row_culprit(func.overloadpacket.__name__, tuple(v for _, v in inputs), bad_out)
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
            upstream = next((o for o in map(self.origin_of, bad_in) if o is not None), None)
            self.symptom_of = upstream or next(iter(self.origins), None)


@dataclasses.dataclass(frozen=True)
class _OpInfo:
    """What the checks need to know of an aten overload, computed once: an OpOverload hashes in Python,
    so the half-dozen set lookups per op it replaces cost more than many of the ops themselves."""

    name: str
    no_values: bool
    trivial: bool
    spectral: tuple[str, int] | None
    linalg: bool
    view: bool
    mutated: tuple[int, ...]
    overwrite: bool
    fresh: bool
    preserving: bool


_INFOS: dict[int, tuple[object, _OpInfo]] = {}  # id(func) -> (func, info): the reference pins the id


def _info(func) -> _OpInfo:
    entry = _INFOS.get(id(func))
    if entry is None:
        packet = func.overloadpacket
        info = _OpInfo(name=op_name(func), no_values=packet in _NO_VALUES, trivial=packet in _TRIVIAL,
                       spectral=_SPECTRAL_OPS.get(packet), linalg=is_linalg_op(str(func)), view=_is_view(func),
                       mutated=_mutated_positions(func), overwrite=packet in _OVERWRITE, fresh=packet in _FRESH,
                       preserving=packet in _PRESERVING)
        entry = _INFOS[id(func)] = (func, info)
    return entry[1]
