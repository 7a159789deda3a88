"""The locator's function mode: map each autograd node created in forward to its forward context.

A backward op runs inside ``torch._C._current_autograd_node()``; this map gives that node the module,
source line and torch function that created it in forward, and the eigenvalues/singular values of an
eigh/svd forward. It also installs the complex-phase checks that dispatch modes make PyTorch skip.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, resolve_name

from ris_stability.observe import guard
from ris_stability.observe.frames import user_stack
from ris_stability.locate.ops import _tensors
from ris_stability.locate.clusters import CLUSTER_HOOKS
from ris_stability.locate.phase import _PHASE_CHECKS
from ris_stability.locate.stack import _Context


_NAMES: dict[Any, str] = {}


def _name_of(func) -> str:
    """torch.overrides.resolve_name, cached: it enters a warnings filter on every call, which costs more
    than many of the ops it names."""
    try:
        return _NAMES[func]
    except KeyError:
        name = _NAMES[func] = resolve_name(func) or getattr(func, "__name__", "")
        return name
    except TypeError:  # an unhashable callable: resolve_name looks functions up by hash too
        return getattr(func, "__name__", "")


class _ForwardRecorder(TorchFunctionMode):
    def __init__(self, recorder: "_NodeRecorder"):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        s = self.recorder
        outer, s.function = s.function, _name_of(func)
        try:
            out = func(*args, **(kwargs or {}))
            guard.call("locator", s.register_nodes, out)
        finally:
            s.function = outer
        return out


class _NodeRecorder:
    """Node-context part of a locator session (combined with the dispatch checks, whose module stack,
    phase, last forward op and pending spectrum it reads)."""

    def __init__(self):
        self.function = ""
        self.nodes: dict[Any, _Context | None] = {}
        self.hook_handles: list = []
        self.cluster_leaks: dict[Any, float] = {}  # eigh/svd node -> share of its gradient inside tied clusters
        self._order: list[Any] = []  # the nodes by registration, for hooks that must not hold their own node
        self.running_node = None  # the node backward entered last (its pre-hook ran): the one that raised

    def _context(self):
        """(phase, node name, forward context) of the op running now."""
        node = torch._C._current_autograd_node()  # set inside backward, also one that fn runs itself
        if node is not None:
            return "backward", node.name(), self.nodes.get(node) or _Context()
        if self.phase == "backward":
            return "backward", "", _Context()
        return "forward", "", _Context(self.modules.current(), user_stack(), self.function, "")

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
            self.hook_handles.append(node.register_prehook(functools.partial(self._entered, len(self._order))))
            self._order.append(node)
            name = node.name()
            if name in _PHASE_CHECKS:
                self.hook_handles.append(_PHASE_CHECKS[name](node))
            if name in CLUSTER_HOOKS:
                self.hook_handles.append(CLUSTER_HOOKS[name](node, self.cluster_leaks))
            node_ctx = ctx
            forward_cls = getattr(node, "_forward_cls", None)
            if forward_cls is not None:  # a custom autograd.Function: apply() bypasses function modes
                node_ctx = dataclasses.replace(ctx, function=f"{forward_cls.__qualname__}.apply")
            name = name.lower()
            if self.pending_spectrum is not None and ("eig" in name or "svd" in name):
                # The decomposition's own call site: for a custom autograd.Function the node is only
                # found when a later op consumes its output, possibly on another line.
                kind, values, stack, module = self.pending_spectrum
                node_ctx = dataclasses.replace(node_ctx, spectrum=(kind, values), stack=stack, module=module)
                self.pending_spectrum = None
            self.nodes[node] = node_ctx

    def _entered(self, index: int, grad_outputs: Any) -> None:
        self.running_node = self._order[index]

    def _remove_node_hooks(self) -> None:
        for handle in self.hook_handles:
            if handle is not None:
                handle.remove()
        self.hook_handles = []

