"""Per-op analysis for the locator: which aten ops to check, their inputs, culprit values and
spectral summaries of linear-algebra inputs."""
from __future__ import annotations

import cmath
import logging
import math
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ris_stability.linalg import registry
from ris_stability.linalg.site_stats import complex_gap_stats
from ris_stability.locate.causes import is_linalg_op
from ris_stability.numerics import stats as spectrum_stats

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
# Ops that return no new values: nothing to check.
_NO_VALUES = frozenset({_aten.resize_, _aten.set_, _aten._local_scalar_dense})
# Ops whose output does not depend on their inputs' values (uninitialised memory): a NaN in their
# output is their own (an "uninitialised memory was read" origin), whatever their input held.
_FRESH = frozenset({_aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided})
# In-place ops that overwrite ``self`` completely: its previous content is not an input.
_OVERWRITE = frozenset({_aten.copy_, _aten.fill_, _aten.zero_, _aten.normal_, _aten.uniform_, _aten.random_,
                        _aten.bernoulli_, _aten.exponential_, _aten.geometric_, _aten.log_normal_, _aten.cauchy_})
# Ops whose output holds only values of their floating-point tensor inputs (copies, reorderings,
# selections, negation, a gradient scattered into zeros): finite whenever those inputs are, so an output of
# inputs already checked finite needs no check of its own. No op here takes a fill value or narrows a dtype.
_PRESERVING = frozenset(op for op in (getattr(_aten, name, None) for name in (
    "clone", "_unsafe_view", "neg", "conj_physical", "flip", "roll", "repeat", "cat", "stack", "index",
    "index_select", "gather", "take_along_dim", "select_backward", "slice_backward", "diagonal_backward",
    "view_copy", "permute_copy", "transpose_copy", "t_copy", "expand_copy", "slice_copy", "select_copy",
    "diagonal_copy", "unsqueeze_copy", "squeeze_copy", "_reshape_copy")) if op is not None)
# aten op -> (kind, index of its spectrum in the output): the registry's ops that name aten ops whose
# spectrum the locator summarises when a non-finite value is born downstream ("eigh", "svd" or "eig").
_SPECTRAL_OPS = registry.derived_table(lambda: {getattr(_aten, packet): (op.kind, registry.spectrum_at(op))
                                                for op in registry.OPS.values() for packet in op.aten})
_CHECK_ERRORS = _aten._linalg_check_errors
# Bookkeeping ops that never name what the user computed.
_TRIVIAL = frozenset({_aten.detach, _aten.alias, _aten.lift_fresh, _aten.view, _aten._unsafe_view})


def op_name(func) -> str:
    """'aten.div.Tensor', 'aten.log' (the '.default' overload is dropped)."""
    name = str(func)
    return name[: -len(".default")] if name.endswith(".default") else name


def _finite(t: Tensor) -> bool:
    # A sum is finite only if every entry is (one NaN/Inf poisons it) and costs a fraction of an
    # elementwise isfinite; an overflowing sum of finite entries falls through to the exact test.
    # Both run on the detached tensor: no graph is recorded, so no grad-mode switch is needed.
    if t.numel() == 0:
        return True
    t = t.detach()
    total = t.sum().item()
    if cmath.isfinite(total) if isinstance(total, complex) else math.isfinite(total):
        return True
    return bool(torch.isfinite(t).all())


def _is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


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
    """Worst-case statistics of the spectrum ``values`` an op of registry ``kind`` returned."""
    spec = registry.KINDS.get(kind)
    if spec is not None and spec.statistics == "eig":
        # complex, unordered eigenvalues: pairwise gaps (the eig backward divides by them)
        stats = complex_gap_stats(values.detach(), dtype or values.dtype)
        mags = values.detach().abs().to(torch.float64)
        stats.update(lambda_max=mags.amax(-1), n=torch.full_like(mags[..., 0], float(values.shape[-1])))
        return spectrum_stats.to_floats(spectrum_stats.worst(stats))
    sorted_eigen = spec is not None and spec.output.spectrum == "eigenvalues"
    fn = spectrum_stats.eigen_stats if sorted_eigen else spectrum_stats.singular_stats
    return spectrum_stats.to_floats(spectrum_stats.worst(fn(values.detach(), dtype=dtype)))


def _matrix_spectral(op: str, t: Any) -> dict[str, float]:
    """Spectral statistics of a finite square matrix input of a linear-algebra op, else {}."""
    if (not _is_float(t) or t.dim() < 2 or t.shape[-1] != t.shape[-2] or t.numel() == 0
            or not is_linalg_op(op) or not _finite(t)):
        return {}
    try:
        return spectrum_stats.to_floats(spectrum_stats.worst(spectrum_stats.matrix_stats(t)))
    except torch.linalg.LinAlgError as exc:
        # The statistics' own eigvalsh failed on this input: report the op without them rather
        # than let the instrument's error pass for the user's.
        logger.warning("locator: no spectral statistics for an input of %s: %s", op, exc)
        return {}



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
