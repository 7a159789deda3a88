"""Statistics of one observed linear-algebra call, by kind of op: kind -> function, extendable.

Each function takes the detached, flattened input matrices ``flat`` (b, m, n) (the first ``max_matrices``
of the batch), the op's output ``out`` (None when the op raised) and the signal dimension ``k``, and
returns a dict of (b,) float64 tensors over STAT_KEYS (missing keys are NaN). It reuses what the op
computed (the eigenvalues of eigh/eigvalsh, the singular values of svd/svdvals) and factorises the
input itself only for ops that give no spectrum (cholesky: eigvalsh; solve/inv/...: svdvals).
Nothing here synchronises with the device.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ris_stability.linalg import registry
from ris_stability.linalg.norms import SPECTRAL_ORDERS, norm_kind
from ris_stability.linalg.op_spec import Kind, Output
from ris_stability.numerics.stats import (STAT_KEYS, eig_stats, hermitian_error, matrix_stats,
                                       pinv_cutoff_margin)
from ris_stability.numerics.spectrum import columns, eigen_table, poison_rows, singular_table
from ris_stability.numerics.tolerances import tie_tol

log = logging.getLogger(__name__)

StatsFn = Callable[[Tensor, Any, Any], dict[str, Tensor]]


@dataclass(frozen=True)
class Measurement:
    """How a kind of op is measured: its statistics, which outputs hold vectors whose gradient is the
    tie hazard, and whether its input is Hermitian by contract (a Hermitian error is then a finding).
    ``table``: for the kinds that return their spectrum, the statistics of that spectrum as one
    (b, len(STAT_KEYS)) tensor (fewer kernels than a dict of columns: the probe's per-step cost); their
    ``stats`` then only serve a call that raised (no output), from the input alone."""

    stats: StatsFn
    vector_outputs: tuple[int, ...] = ()
    hermitian: bool = False
    table: Callable[[Tensor, Any, Any], Tensor] | None = None
    input_table: Callable[[Tensor, Any, Any], Tensor] | None = None  # ``stats`` as one table (any call)


def nan_rows(flat: Tensor) -> Tensor:
    return torch.full(flat.shape[:-2], math.nan, dtype=torch.float64, device=flat.device)


def leading_rows(t: Tensor, trailing: int, b: int | None = None) -> Tensor:
    """``t`` detached with its leading dims flattened into one, ``(rows, *t.shape[-trailing:])``, and only its
    first ``b`` rows (all when ``b`` is None); a view, taken without a kernel the shape does not need (a
    per-sample loop makes a call per sample)."""
    flat = t.detach()
    if flat.dim() != trailing + 1:
        flat = flat.reshape(-1, *flat.shape[flat.dim() - trailing:])
    return flat if b is None or flat.shape[0] <= b else flat[:b]


def _first(values: Tensor, b: int) -> Tensor:
    return leading_rows(values, 1, b)


def general_table(flat: Tensor, out: Any, k) -> Tensor:
    """Singular-value statistics of general (b, m, n) matrices as (b, len(STAT_KEYS)) float64; NaN (but ``n``)
    for matrices with non-finite entries."""
    finite = flat.abs().amax((-2, -1)) < math.inf  # amax propagates NaN: below inf exactly when all entries are finite
    safe = torch.where(finite[..., None, None], flat, 0.0)
    return poison_rows(singular_table(torch.linalg.svdvals(safe), k=k, dtype=flat.dtype), finite)


def general_stats(flat: Tensor, out: Any, k) -> dict[str, Tensor]:
    """:func:`general_table` as a dict of the spectrum's columns (SORTED_KEYS)."""
    return columns(general_table(flat, out, k))


def complex_gap_stats(w: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """Gap statistics of unordered complex eigenvalues (..., n): the eig backward divides by w_j - w_i."""
    n = w.shape[-1]
    w = w.detach().to(torch.complex128)
    dist = (w.unsqueeze(-1) - w.unsqueeze(-2)).abs()
    off = ~torch.eye(n, dtype=torch.bool, device=w.device)
    min_gap = torch.where(off, dist, torch.full_like(dist, math.inf)).flatten(-2).amin(-1)
    if n == 1:
        min_gap = torch.full_like(min_gap, math.nan)
    # Largest number of eigenvalues within the tie tolerance of one of them (unordered: no chains).
    near = (dist <= tie_tol(n, dtype, w.abs().amax(-1))[..., None, None]).sum(-1)
    # amax + argmax, not max(dim): on CPU the (values, indices) reduction of a tiny tensor can cost
    # a thread-pool round trip (measured 23 ms vs 0.02 ms on 2 busy threads).
    size, centre = near.amax(-1), near.argmax(-1)
    value = w.abs().gather(-1, centre.unsqueeze(-1)).squeeze(-1)
    return {"min_gap": min_gap, "amplification": 1.0 / min_gap, "max_cluster": size.to(torch.float64),
            "cluster_value": torch.where(size > 1, value, torch.full_like(value, math.nan))}


def _from_input(flat: Tensor, out: Any, k) -> dict[str, Tensor]:
    """Hermitian kinds whose call raised: eigenvalues of the input's Hermitian part."""
    return matrix_stats(flat, k=k)


HERM_SAMPLE = 4  # matrices of a batch whose Hermitian error is measured (an O(n^2) pass per matrix)


def _eigh_table(index: int | None):
    def table(flat: Tensor, out: Any, k) -> Tensor:
        """The spectrum statistics of every matrix of the batch (O(n) each, from the op's eigenvalues) and
        the Hermitian error of the first HERM_SAMPLE (NaN for the others: the worst case ignores them)."""
        values = out if index is None else out[index]
        b = flat.shape[0]
        herm = hermitian_error(flat[:HERM_SAMPLE])
        if b > HERM_SAMPLE:
            herm = torch.cat([herm, torch.full((b - HERM_SAMPLE,), math.nan, dtype=herm.dtype, device=herm.device)])
        return eigen_table(_first(values, b), k=k, dtype=flat.dtype, herm_err=herm)
    return table


def _svd_table(index: int | None):
    def table(flat: Tensor, out: Any, k) -> Tensor:
        s = out if index is None else out[index]
        return singular_table(_first(s, flat.shape[0]), k=k, dtype=flat.dtype)
    return table


def _eig_at(index: int | None) -> StatsFn:
    def stats(flat: Tensor, out: Any, k) -> dict[str, Tensor]:
        # Conditioning (svdvals) is not an eig hazard: nothing is inverted; the hazards are eigenvalue
        # separation, non-normality and a Hermitian input that wants eigh.
        result: dict[str, Tensor] = {"n": torch.full(flat.shape[:-2], float(flat.shape[-1]), dtype=torch.float64,
                                                     device=flat.device)}
        if out is not None:  # eig raises on a non-finite input, so its output means a finite one
            w = _first(out if index is None else out[index], flat.shape[0])
            result.update(complex_gap_stats(w, flat.dtype))
            result.update(eig_stats(flat, w))
            mags = w.abs().to(torch.float64)
            result.update(lambda_max=mags.amax(-1), lambda_min=mags.amin(-1))
        return result
    return stats


def _pinv(flat: Tensor, out: Any, k) -> dict[str, Tensor]:
    """pinv's hazard is its cut-off (default rtol), not the condition number: it never inverts the
    singular values it drops."""
    result = general_stats(flat, None, k)
    finite = torch.isfinite(flat).all(-1).all(-1)
    safe = torch.where(finite[..., None, None], flat, torch.zeros_like(flat))
    margin = pinv_cutoff_margin(torch.linalg.svdvals(safe), flat.shape[-2], flat.shape[-1], flat.dtype)
    result["cutoff_margin"] = torch.where(finite, margin, torch.full_like(margin, math.nan))
    return result


def _norm_stats(order: Any) -> StatsFn:
    """A matrix norm's statistics: the gap its order depends on (top for 2, bottom for -2, none for 'nuc')."""
    def stats(flat: Tensor, out: Any, k) -> dict[str, Tensor]:
        r = min(flat.shape[-2:])
        split = 1 if order == 2 else (r - 1 if order == -2 else None)
        return general_stats(flat, None, split)
    return stats


# The statistics families a registry Kind names (``Kind.statistics``); register_kind adds its own.
_FAMILIES: dict[str, Callable[[Kind], StatsFn]] = {
    "hermitian": lambda kind: _from_input,
    "singular": lambda kind: general_stats,
    "eig": lambda kind: _eig_at(kind.output.at),
    "pinv": lambda kind: _pinv,
    **{norm_kind(order): (lambda kind, order=order: _norm_stats(order)) for order in SPECTRAL_ORDERS},
}
_CUSTOM: dict[str, StatsFn] = {}
_FAMILY_TABLES: dict[str, Callable[[Tensor, Any, Any], Tensor]] = {"singular": general_table}


def _table_of(kind: Kind) -> Callable[[Tensor, Any, Any], Tensor] | None:
    output = kind.output
    if not output.sorted:
        return None
    return _eigh_table(output.at) if output.spectrum == "eigenvalues" else _svd_table(output.at)


def _measurements() -> dict[str, Measurement]:
    found = {}
    for name, kind in registry.KINDS.items():
        if not kind.statistics:  # resolved per call into another kind (a norm into its order)
            continue
        stats = _CUSTOM.get(name)
        if stats is None and kind.statistics not in _FAMILIES:
            log.warning("kind %r names statistics %r, which linalg.site_stats does not compute (known: %s; "
                        "register_kind adds a kind with its own): its calls are not measured", name,
                        kind.statistics, ", ".join(sorted(_FAMILIES)))
            continue
        found[name] = Measurement(stats or _FAMILIES[kind.statistics](kind), kind.output.vectors, kind.hermitian,
                                  _table_of(kind), None if stats else _FAMILY_TABLES.get(kind.statistics))
    return found


# kind -> how its calls are measured, for every kind of the registry with statistics of its own.
KINDS: Mapping[str, Measurement] = registry.derived_table(_measurements)


def register_kind(name: str, stats: StatsFn, vector_outputs: tuple[int, ...] = (), hermitian: bool = False) -> None:
    """Add (or replace) a kind of op with its own statistics, for ops registered with
    ris_stability.linalg.registry.register (measured call by call)."""
    _CUSTOM[name] = stats
    registry.register_kind(Kind(name, name, Output(vectors=tuple(vector_outputs)), hermitian, batched=False))


def stat_rows(kind: str, flat: Tensor, out: Any, k) -> Tensor:
    """(b, len(STAT_KEYS)) float64 statistics of the call, one row per matrix, columns in STAT_KEYS order."""
    spec = KINDS[kind]
    if spec.table is not None and out is not None:
        return spec.table(flat, out, k)
    if spec.input_table is not None:
        return spec.input_table(flat, out, k)
    stats = spec.stats(flat, out, k)
    if spec.hermitian and "herm_err" not in stats:
        stats["herm_err"] = hermitian_error(flat)
    nan = None
    columns = []
    for key in STAT_KEYS:
        value = stats.get(key)
        if value is None:
            nan = nan_rows(flat) if nan is None else nan
            value = nan
        columns.append(value.to(torch.float64))
    return torch.stack(columns, dim=-1)


# Kinds whose calls can be measured together: the statistics of a site called once per sample in a Python
# loop are computed per step on the concatenated calls, not per call (a dozen small kernels each). From the
# spectrum the output gives, or from the input alone; other kinds (norm orders, register_kind) call by call.
_OUTPUT_KINDS = registry.derived_names(
    lambda: (k.name for k in registry.KINDS.values() if k.batched and k.statistics and k.output.spectrum))
_INPUT_KINDS = registry.derived_names(
    lambda: (k.name for k in registry.KINDS.values() if k.batched and k.statistics and not k.output.spectrum))
NOT_BATCHABLE = object()
# The output each tuple-returning kind's statistics read: eigenvalues of eigh/eig, S of svd.
_SPECTRUM_OUTPUT = registry.derived_table(
    lambda: {k.name: (k.output.at,) for k in registry.KINDS.values() if k.output.spectrum and k.output.at is not None})


def batch_parts(kind: str, out: Any, batch_dims: int, b: int) -> Any:
    """The part of an op's output its statistics need, flattened to ``b`` leading rows so calls can be
    concatenated: None for kinds measured from the input alone, NOT_BATCHABLE when it cannot be done."""
    if kind in _INPUT_KINDS:
        return None
    if kind not in _OUTPUT_KINDS or out is None:
        return NOT_BATCHABLE
    items = out if isinstance(out, (tuple, list)) else (out,)
    if not all(isinstance(t, Tensor) and t.dim() >= batch_dims for t in items):
        return NOT_BATCHABLE
    # Only the output the statistics read (the spectrum); the vectors would be copied for nothing.
    used = _SPECTRUM_OUTPUT.get(kind, range(len(items)))
    flat = tuple(leading_rows(t, t.dim() - batch_dims, b) if i in used else None for i, t in enumerate(items))
    return flat if isinstance(out, (tuple, list)) else flat[0]


def _group_key(kind: str, flat: Tensor, parts: Any, k) -> tuple:
    shapes = tuple(t.shape[1:] for t in (parts if isinstance(parts, tuple) else (parts,)) if t is not None)
    return kind, tuple(flat.shape[1:]), flat.dtype, flat.device, shapes, k


def batched_rows(calls: list[tuple[str, Tensor, Any, Any]]) -> list[tuple[str, Tensor, Any, Any]]:
    """Deferred calls (kind, flat, parts, k) merged into one (kind, flat, parts, k) per group of calls with
    the same kind, shapes, dtype, device and signal dimension (an int or None); order within kept."""
    groups: dict[tuple, list[tuple[str, Tensor, Any, Any]]] = {}
    for call in calls:
        groups.setdefault(_group_key(*call), []).append(call)
    merged = []
    for members in groups.values():
        kind, flat, parts, k = members[0]
        if len(members) == 1:
            merged.append((kind, flat, parts, k))
            continue
        flat = torch.cat([m[1] for m in members])
        if isinstance(parts, tuple):
            parts = tuple(None if parts[i] is None else torch.cat([m[2][i] for m in members])
                          for i in range(len(parts)))
        elif parts is not None:
            parts = torch.cat([m[2] for m in members])
        merged.append((kind, flat, parts, k))
    return merged
