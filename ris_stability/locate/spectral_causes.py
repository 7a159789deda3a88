"""Causes and remedies of a non-finite eigh / SVD backward, chosen from the evidence, in the user's terms.

The evidence: the op (eigh or SVD: eigenvalues or singular values, units of lambda or s), the forward's
spectrum statistics (largest tied cluster, its value, the smallest gap), the dtype, the call site, and
the share of the incoming vector gradient inside the tied clusters (``cluster_leak``, measured by the
locator before the backward divides). From it:

* whether the cluster sits at the rounding floor (|value| <= n eps max: the null space of a rank-deficient
  matrix; diagonal loading would only move the tie) or above it (typically the level of a diagonal
  loading, which creates the tie by lifting a null space to one common value);
* whether the loss is invariant inside the cluster (then the gap-aware backward is exact);
* the one line that applies the fix: ``with ris_stability.gap_aware():``.

Generic words only; a model integration may add its own (a config key) to the finding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ris_stability.locate.finding import TensorSummary
from ris_stability.numerics.tolerances import cluster_leak_tol, rank_tol, zero_level

ONE_LINE = "with ris_stability.gap_aware():"
FLOOR_PHRASE = "rank-deficient: loading will not help"
LEAK_KEY = "cluster_leak"


@dataclass(frozen=True)
class Words:
    op: str  # as the user writes it
    values: str
    vector: str
    symbol: str
    call: str
    values_only: str
    only: str  # with its article: "an eigenvalue-only"


WORDS = {
    "eigh": Words("eigh", "eigenvalues", "eigenvector", "lambda", "torch.linalg.eigh", "torch.linalg.eigvalsh",
                  "an eigenvalue-only"),
    "svd": Words("SVD", "singular values", "singular-vector", "s", "torch.linalg.svd", "torch.linalg.svdvals",
                 "a singular-value-only"),
}


@dataclass(frozen=True)
class Evidence:
    words: Words
    stats: Mapping[str, float] | None
    dtype: str
    where: str  # "torch.linalg.svd at model.py:42"

    def get(self, key: str) -> float:
        return math.nan if self.stats is None else float(self.stats.get(key, math.nan))

    def _dtype(self) -> torch.dtype | None:
        real = getattr(torch, self.dtype, None)
        return real if isinstance(real, torch.dtype) and (real.is_floating_point or real.is_complex) else None

    def _n(self) -> int:
        return int(self.get("n")) if math.isfinite(self.get("n")) else 0

    @property
    def floor(self) -> float:
        """Rounding floor n eps max|x| of the spectrum (NaN when unknown)."""
        dtype = self._dtype()
        return math.nan if dtype is None else float(rank_tol(self._n(), dtype, abs(self.get("lambda_max"))))

    def at_floor(self) -> bool | None:
        """True: the tied cluster is the null space of a rank-deficient matrix (within the rounding floor, and the
        smallest value at the level of a computed zero); False: lifted above it (e.g. by a diagonal loading,
        which lifts the smallest value too); None: unknown."""
        value, low, floor, dtype = self.get("cluster_value"), self.get("lambda_min"), self.floor, self._dtype()
        if dtype is None or not all(map(math.isfinite, (value, low, floor))):
            return None
        return abs(value) <= floor and low <= zero_level(self._n(), dtype, abs(self.get("lambda_max")))

    def invariant(self) -> bool | None:
        leak, dtype = self.get(LEAK_KEY), self._dtype()
        return None if not math.isfinite(leak) or dtype is None else leak <= cluster_leak_tol(dtype)


def _evidence(kind: str, inputs: tuple[TensorSummary, ...], function: str, location: str) -> Evidence:
    summary = next((s for s in inputs if s.spectral and "max_cluster" in s.spectral), None)
    words = WORDS[kind]
    call = function if function and "." in function and not function.endswith(".apply") else words.call
    where = call + (f" at {location}" if location else "")
    return Evidence(words, None if summary is None else summary.spectral,
                    summary.dtype if summary is not None else "", where)


def _one_line(ev: Evidence) -> str:
    w, invariant = ev.words, ev.invariant()
    text = (f"one line: run the forward inside `{ONE_LINE}` (around the loss call, the training step or the whole "
            f"script; `risdiag trace --gap-aware` does it for a traced run): {ev.where} then keeps its forward and "
            f"uses the gap-aware {w.op} backward, which drops the pairs of tied {w.values} instead of dividing by "
            f"their zero gaps")
    if invariant is True:
        return text + (f"; the gradient reaching the {w.op} is invariant inside the tied cluster (share "
                       f"{ev.get(LEAK_KEY):.1e} of it there), so the gap-aware gradient is exact")
    if invariant is False:
        return text + (f"; but the loss tells the {w.vector}s inside the tied cluster apart (share "
                       f"{ev.get(LEAK_KEY):.1e} of its gradient there): that part has no defined gradient and is "
                       "dropped, so also make the loss depend on the whole cluster")
    return text + (f"; exact when the loss is invariant inside the cluster (a projector onto a gapped top-k, a "
                   f"function of the {w.values})")


def _level(ev: Evidence) -> list[str]:
    w, floor, at_floor = ev.words, ev.floor, ev.at_floor()
    size, value = int(ev.get("max_cluster")), ev.get("cluster_value")
    if at_floor is True:
        return [f"{FLOOR_PHRASE}: the {size} tied {w.values} sit at the rounding floor ({value:.1e} <= n eps "
                f"max|{w.symbol}| = {floor:.1e}, smallest {ev.get('lambda_min'):.1e}, in units of {w.symbol}): the "
                "null space of a rank-deficient matrix; diagonal loading would only move the tie up to the loading "
                "level"]
    if at_floor is False:
        return [f"the {size} tied {w.values} sit at {value:.1e}, lifted above the rounding floor (smallest "
                f"{ev.get('lambda_min'):.1e}, units of {w.symbol}): diagonal loading (alpha * tr/N * I) creates such a tie by lifting a null space to one "
                "common value; remove the loading in front of the decomposition, or add distinct values (a ramp) "
                "instead of a multiple of I"]
    return [f"where the tied {w.values} sit tells what to change: at a diagonal loading level (alpha * tr/N * I), "
            f"the loading creates the tie (remove it or use distinct values); at the rounding floor (n eps "
            f"max|{w.symbol}|) the matrix is rank-deficient and loading will not help"]


def _others(ev: Evidence) -> list[str]:
    w = ev.words
    subspace = (f"make the loss depend only on a subspace separated by a real gap (a projector onto the top-k "
                f"{w.vector}s), never on individual {w.vector}s inside a cluster")
    values_only = (f"use {w.only} loss ({w.values_only}) where {w.vector}s are not needed: its gradient "
                   "is finite for any input")
    out = [subspace, values_only]
    if ev.at_floor() is not True:  # at the floor the null space stays tied in float64 too
        out.append(f"compute the {w.op} in float64 / complex128 (cast before the decomposition, back after)")
    return out


def remedies(ev: Evidence, tie: bool) -> tuple[str, ...]:
    first = [_one_line(ev)] + (_level(ev) if tie else [])
    rest = _others(ev)
    if ev.invariant() is False:  # the loss itself must change first
        first, rest = [rest[0]] + first, rest[1:]
    return tuple(first + rest)


def spectral_cause(kind: str, inputs: tuple[TensorSummary, ...], function: str, location: str,
                   out_kind: str) -> tuple[str, str, tuple[str, ...]]:
    """(key, sentence, remedies) for a non-finite backward of an eigh (``kind`` "eigh") or SVD ("svd")."""
    ev = _evidence(kind, inputs, function, location)
    w = ev.words
    if ev.stats is None:
        return (f"{kind}_backward", f"non-finite {w.vector} gradient in {kind} backward (gaps unknown)",
                remedies(ev, tie=False))
    cluster, value, gap = ev.get("max_cluster"), ev.get("cluster_value"), ev.get("min_gap")
    unit = "" if kind == "eigh" else " (gaps in s^2: it divides by s_j^2 - s_i^2)"
    if cluster >= 2 and gap == 0:
        return (f"{kind}_exact_tie", f"{w.vector} gradient through exactly tied {w.values} (cluster of "
                f"{int(cluster)} at {value:.1e}): 0/0 in {kind} backward{unit}", remedies(ev, tie=True))
    if cluster >= 2:
        return (f"{kind}_near_tie", f"{w.vector} gradient through {w.values} tied within rounding (cluster of "
                f"{int(cluster)} at {value:.1e}, smallest gap {gap:.1e}): 1/gap overflow in {kind} backward{unit}",
                remedies(ev, tie=True))
    return (f"{kind}_small_gap", f"{w.vector} gradient amplified by 1/gap (smallest gap {gap:.1e}, amplification "
            f"{ev.get('amplification'):.1e}): {out_kind} in {kind} backward{unit}", remedies(ev, tie=False))
