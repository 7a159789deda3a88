"""What the locator's ``fn`` is given and returns: argument names, root modules, non-finite
inputs, the scalar loss and the leaves it depends on."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

from torch import Tensor, nn

from ris_stability.locate.causes import Observation, explain
from ris_stability.locate.finding import Finding, TensorSummary
from ris_stability.locate.masks import only_neg_inf
from ris_stability.locate.ops import _finite, _is_float


class LocatorUsageError(TypeError):
    """``fn`` did not return a scalar loss tensor."""


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


def bind_arguments(fn: Callable, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """(parameter name, value) of a call; positional fallbacks 'args[i]' when fn has no signature."""
    target = fn.forward if isinstance(fn, nn.Module) else fn  # a module's call signature is (*args, **kwargs)
    try:
        return list(inspect.signature(target).bind(*args, **kwargs).arguments.items())
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


def _bad(t: Any) -> bool:
    return _is_float(t) and not _finite(t) and not only_neg_inf(t)


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def find_nonfinite(value: Any, path: str, seen: set[int] | None = None,
                   depth: int = 0) -> tuple[str, str, Tensor] | None:
    """First (path, module path, tensor) holding NaN/Inf inside tensors, lists, tuples, dicts,
    dataclasses and modules (parameters and buffers). A tensor whose only non-finite entries are -inf is
    an additive mask, not a fault: the locator follows it instead (see locate/masks.py)."""
    seen = set() if seen is None else seen
    if id(value) in seen or depth > 8:
        return None
    seen.add(id(value))
    if isinstance(value, Tensor):
        return (path, "", value) if _bad(value) else None
    if isinstance(value, nn.Module):
        for name, t in list(value.named_parameters()) + list(value.named_buffers()):
            if _bad(t):
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
