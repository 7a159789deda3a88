"""THE op registry: every linear-algebra entry point the toolkit observes, declared once.

Each op (:class:`~ris_stability.linalg.op_spec.LinalgOp`) is registered once with its spellings (the torch
functions and Tensor methods it is called through, each recorded under its own name), its kind (how a call
is measured and what its output already gives: :class:`~ris_stability.linalg.op_spec.Kind`), its hazard in its
own words and units, the hazards rule that judges it and the aten ops the locator reads its spectrum from,
in the spirit of the op registry of torch.utils.flop_counter. Every other table is derived from it:

* the entry points ``observe.intercept`` swaps wrappers in for (filled by :func:`register`);
* the statistics per kind and which calls are measured together (``linalg.site_stats``);
* the names each hazard rule judges (``linalg.hazards``: CONDITION_OPS, EIG_OPS, PINV_OPS);
* the aten ops whose spectrum the locator summarises (``locate.ops``).

Derived tables are live (:func:`derived_names`, :func:`derived_table`): an op registered later, e.g. by a
user with :func:`register`, appears in all of them. Pure data and pure functions; no torch call is made at
import except looking the entry points up.
"""
from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any, Callable, Iterator

import torch

from ris_stability.linalg.norms import SPECTRAL_ORDERS, matrix_order, norm_kind
from ris_stability.linalg.op_spec import (CONDITION, EIG, PINV, RULES, TIE, HazardWords, Kind, LinalgOp, Output,
                                          RegistryError, Spelling)
from ris_stability.observe import intercept

_KINDS: dict[str, Kind] = {}
_OPS: dict[str, LinalgOp] = {}
_BY_BASE: dict[str, LinalgOp] = {}  # every base name an op records (its name, its aliases) -> the op
_version = 0  # bumped by every registration: derived tables recompute on their next read


def register_kind(kind: Kind) -> Kind:
    """Declare (or replace) a kind of op: how its calls are measured, what their output gives."""
    global _version
    _KINDS[kind.name] = kind
    _version += 1
    return kind


def register(op: LinalgOp) -> LinalgOp:
    """Declare an op once: from the next time a listener starts its spellings are observed, and every
    derived table (statistics, hazard rules, locator) knows it."""
    global _version
    kinds = {op.kind, *(s.kind for s in op.spellings if s.kind)}
    if not kinds <= _KINDS.keys():
        raise RegistryError(f"op {op.name!r}: kind(s) {sorted(kinds - _KINDS.keys())} not declared; declare them "
                            f"with register_kind first (known: {sorted(_KINDS)})")
    if op.rule not in RULES:
        raise RegistryError(f"op {op.name!r}: rule {op.rule!r} is not one of {RULES}")
    for base in (op.name, *op.aliases):
        other = _BY_BASE.get(base)
        if other is not None and other.name != op.name:
            raise RegistryError(f"op {op.name!r} records {base!r}, which op {other.name!r} already records: a "
                                "site name must resolve to one op")
    for packet in op.aten:
        claimed = next((o.name for o in _OPS.values() if packet in o.aten and o.name != op.name), None)
        if claimed is not None or not hasattr(torch.ops.aten, packet):
            raise RegistryError(f"op {op.name!r}: aten op {packet!r} " + (
                f"is already read by op {claimed!r}" if claimed else "does not exist in this torch"))
    _OPS[op.name] = op
    _BY_BASE.update(dict.fromkeys((op.name, *op.aliases), op))
    for s in op.spellings:
        if hasattr(s.owner, s.attr):  # a spelling missing from this torch version is skipped
            intercept.add_entry_point(s.owner, s.attr, s.name, s.kind or op.kind, s.when)
    _version += 1
    return op


# --- lookups ----------------------------------------------------------------------------------------
def base_name(op: str) -> str:
    """The base name of a recorded op name: 'linalg.eig' -> 'eig', 'linalg.matrix_norm(ord=2)' ->
    'matrix_norm', 'inverse' -> 'inverse'."""
    return op.split("(", 1)[0].rsplit(".", 1)[-1]


def ordered_name(order: Any) -> str:
    """The op a matrix norm of ``order`` is filed under ('matrix_norm_2', 'matrix_norm_nuc')."""
    return f"matrix_norm_{order}"


def lookup(op: str) -> LinalgOp | None:
    """The registered op of a recorded op name ('linalg.svd', 'svd', 'inverse', 'norm(ord=nuc)'); None for
    a name no spelling records (a watched matrix, a function marked ``__spectral_op__``)."""
    if "(ord=" in op:
        ordered = _OPS.get(ordered_name(op[op.find("(ord=") + 5:].rstrip(")")))
        if ordered is not None:
            return ordered
    return _BY_BASE.get(base_name(op))


def info(op: str) -> HazardWords | None:
    """The hazard words of a recorded op name ('linalg.svd', 'svd', 'linalg.matrix_norm(ord=2)')."""
    found = lookup(op)
    return found.words if found is not None else None


def entry_by_function() -> dict[Callable, Any]:
    """The original torch callables of every registered spelling -> its intercept entry point (for
    instruments that see calls through a TorchFunctionMode)."""
    return intercept.entry_by_function()


# --- derived tables -------------------------------------------------------------------------------
class _Live:
    def __init__(self, compute: Callable[[], Any]):
        self._compute, self._seen, self._value = compute, -1, None

    def _current(self) -> Any:
        if self._seen != _version:
            self._value, self._seen = self._compute(), _version
        return self._value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._current()!r})"


class _Names(_Live, Set):
    """A read-only set of names derived from the registry."""

    @classmethod
    def _from_iterable(cls, it) -> frozenset:  # `a | b` of two derived sets is a plain frozenset
        return frozenset(it)

    def __contains__(self, name: object) -> bool:
        return name in self._current()

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


class _Table(_Live, Mapping):
    """A read-only mapping derived from the registry."""

    def __getitem__(self, key: Any) -> Any:
        return self._current()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


def derived_names(compute: Callable[[], Any]) -> Set:
    """A set computed from the registry by ``compute()``, recomputed after each registration."""
    return _Names(lambda: frozenset(compute()))


def derived_table(compute: Callable[[], Mapping]) -> Mapping:
    """A mapping computed from the registry by ``compute()``, recomputed after each registration."""
    return _Table(lambda: dict(compute()))


def rule_names(rule: str) -> Set:
    """Every base name recorded by the ops that ``rule`` judges (names and aliases)."""
    if rule not in RULES:
        raise RegistryError(f"rule {rule!r} is not one of {RULES}")
    return derived_names(lambda: (base for op in _OPS.values() if op.rule == rule for base in (op.name, *op.aliases)))


def spectrum_at(op: LinalgOp) -> int | None:
    """Where the op's output holds its spectrum (None: the output is the spectrum)."""
    return _KINDS[op.kind].output.at


KINDS: Mapping[str, Kind] = derived_table(lambda: _KINDS)
OPS: Mapping[str, LinalgOp] = derived_table(lambda: _OPS)
# Kinds whose statistics come from the sorted spectrum the op returned: cheap enough for the whole batch.
SPECTRUM_KINDS = derived_names(lambda: (k.name for k in _KINDS.values() if k.output.sorted))

# --- the declarations -------------------------------------------------------------------------------
_EIGEN, _SINGULAR = "eigenvalues", "singular values"


def _singular(text: str, unit: str) -> HazardWords:
    """The hazard of an op read from singular values, in ``unit``."""
    return HazardWords(_SINGULAR, text, unit)


def _conditioned(text: str) -> HazardWords:
    """The hazard of an op whose gradient scales with the condition number."""
    return HazardWords(_SINGULAR, text, "log10 condition number")

for _kind in (
    Kind("eigh", "hermitian", Output(_EIGEN, at=0, vectors=(1,), sorted=True), hermitian=True),
    Kind("eigvalsh", "hermitian", Output(_EIGEN, sorted=True), hermitian=True),
    Kind("herm", "hermitian", hermitian=True),  # cholesky, and matrices watched by name
    Kind("svd", "singular", Output(_SINGULAR, at=1, vectors=(0, 2), sorted=True)),
    Kind("svd_old", "singular", Output(_SINGULAR, at=1, vectors=(0, 2), sorted=True)),  # torch.svd: U, S, V
    Kind("svdvals", "singular", Output(_SINGULAR, sorted=True)),
    Kind("general", "singular"),
    Kind("eig", "eig", Output(_EIGEN, at=0, vectors=(1,))),  # complex, unordered: measured per call's batch
    Kind("eigvals", "eig", Output(_EIGEN)),
    Kind("pinv", "pinv"),
    Kind("norm", ""),  # resolved per call by linalg.norms.refine into the kind of its order
    # Norm orders are measured call by call (their statistics take a per-order split of the spectrum).
    *(Kind(norm_kind(order), norm_kind(order), batched=False) for order in SPECTRAL_ORDERS),
):
    register_kind(_kind)

_L, _T, _TENSOR = torch.linalg, torch, torch.Tensor


def _spell(*spellings: tuple) -> tuple[Spelling, ...]:
    return tuple(Spelling(*s) for s in spellings)


_EIG_WORDS = HazardWords(_EIGEN, "the eigenvector gradient divides by eigenvalue gaps lambda_j - lambda_i: a tie "
                         "(gap 0) gives 0/0, a small gap amplifies by 1/gap", "gaps in eigenvalue units")
_INVERTS = _conditioned("the op inverts the matrix: its output and gradient scale with 1/s_min, so "
                       "digits are lost in proportion to the condition number s_max/s_min")
_NORM_SPELLINGS = _spell((_L, "matrix_norm", "linalg.matrix_norm", "", matrix_order),
                         (_L, "norm", "linalg.norm", "", matrix_order),
                         (_T, "norm", "norm", "", matrix_order), (_TENSOR, "norm", "norm", "", matrix_order))
for _op in (
    LinalgOp("eigh", "eigh", _EIG_WORDS, TIE, _spell((_L, "eigh", "linalg.eigh")), aten=("_linalg_eigh",)),
    LinalgOp("eigvalsh", "eigvalsh", HazardWords(_EIGEN, "eigenvalue-only: the gradient V diag(g) V^H is finite "
             "for any spectrum; ties only make V non-unique", "eigenvalue units"),
             TIE, _spell((_L, "eigvalsh", "linalg.eigvalsh"))),
    LinalgOp("svd", "svd", _singular("the singular-vector gradient divides by s_j^2 - s_i^2: tied "
             "singular values (including repeated zeros of a rank-deficient input) give 0/0",
             "gaps in squared singular values (s^2)"),
             TIE, _spell((_L, "svd", "linalg.svd"), (_T, "svd", "svd", "svd_old"), (_TENSOR, "svd", "svd", "svd_old")),
             aten=("_linalg_svd",)),
    LinalgOp("svdvals", "svdvals", _singular("singular-value-only: the gradient U diag(g) V^H is "
             "finite for any spectrum", "singular value units"), TIE, _spell((_L, "svdvals", "linalg.svdvals"))),
    LinalgOp("cholesky", "herm", HazardWords(_EIGEN, "needs lambda_min > 0: fails or loses digits as lambda_min / "
             "lambda_max approaches rounding", "eigenvalue units and log10 condition number"),
             CONDITION, _spell((_L, "cholesky", "linalg.cholesky"), (_L, "cholesky_ex", "linalg.cholesky_ex"),
                               (_T, "cholesky", "cholesky"), (_TENSOR, "cholesky", "cholesky"))),
    LinalgOp("inv", "general", _INVERTS, CONDITION,
             _spell((_L, "inv", "linalg.inv"), (_L, "inv_ex", "linalg.inv_ex"), (_T, "inverse", "inverse"),
                    (_TENSOR, "inverse", "inverse"))),
    LinalgOp("solve", "general", _INVERTS, CONDITION,
             _spell((_L, "solve", "linalg.solve"), (_L, "solve_ex", "linalg.solve_ex"))),
    LinalgOp("lstsq", "general", _INVERTS, CONDITION, _spell((_L, "lstsq", "linalg.lstsq"))),
    LinalgOp("qr", "general", _conditioned("R's diagonal vanishes for a rank-deficient input and the QR "
             "backward divides by it"),
             TIE, _spell((_L, "qr", "linalg.qr"), (_TENSOR, "qr", "qr"), (_T, "qr", "qr"))),
    LinalgOp("pinv", "pinv", _singular("pinv inverts the singular values above its cut-off and drops "
             "the rest: one near the cut-off is dropped or inverted by rounding", "decades from the cut-off"),
             PINV, _spell((_L, "pinv", "linalg.pinv"), (_T, "pinverse", "pinverse"),
                          (_TENSOR, "pinverse", "pinverse"))),
    LinalgOp("eig", "eig", _EIG_WORDS, EIG, _spell((_L, "eig", "linalg.eig")), aten=("linalg_eig",)),
    LinalgOp("eigvals", "eigvals", HazardWords(_EIGEN, "eigenvalue-only, but a non-normal input makes eigenvalues "
             "sensitive (condition of the eigenvector matrix)", "eigenvalue units"),
             EIG, _spell((_L, "eigvals", "linalg.eigvals"))),
    LinalgOp("matrix_norm", "norm", None, TIE, _NORM_SPELLINGS),
    LinalgOp(ordered_name(2), norm_kind(2), _singular("the spectral norm s_1: its gradient u_1 v_1^H "
             "is undefined when s_1 is tied (top gap s_1^2 - s_2^2 = 0)", "top gap in squared singular values (s^2)")),
    LinalgOp(ordered_name(-2), norm_kind(-2), _singular("the smallest singular value s_n: its "
             "gradient u_n v_n^H is undefined when s_n is tied (bottom gap s_(n-1)^2 - s_n^2 = 0)",
             "bottom gap in squared singular values (s^2)")),
    LinalgOp(ordered_name("nuc"), norm_kind("nuc"), _singular("the nuclear norm sum(s): its gradient "
             "U V^H is undefined where a singular value is 0 (rank-deficient input)", "s_min in singular value units")),
    LinalgOp("cond", "general", _conditioned("cond = s_max / s_min: its gradient scales as cond / s_min "
             "and needs s_1 and s_n untied"), TIE, _spell((_L, "cond", "linalg.cond"))),
    LinalgOp("det", "general", _conditioned("the determinant's gradient det(A) A^-H is 0 * inf at a "
             "singular matrix and loses digits with the condition number"),
             CONDITION, _spell((_L, "det", "linalg.det"), (_T, "det", "det"), (_TENSOR, "det", "det"))),
    LinalgOp("slogdet", "general", _conditioned("log|det|'s gradient A^-H scales with 1/s_min: infinite "
             "at a singular matrix"),
             CONDITION, _spell((_L, "slogdet", "linalg.slogdet"), (_T, "slogdet", "slogdet"),
                               (_TENSOR, "slogdet", "slogdet"), (_T, "logdet", "logdet"),
                               (_TENSOR, "logdet", "logdet"))),
    LinalgOp("lu", "general", _conditioned("LU pivots shrink with s_min: a singular matrix has a zero "
             "pivot and the solve / backward divides by it"),
             TIE, _spell((_L, "lu", "linalg.lu"), (_L, "lu_factor", "linalg.lu_factor"),
                         (_L, "lu_factor_ex", "linalg.lu_factor_ex"))),
    LinalgOp("matrix_rank", "general", _singular("the rank counts singular values above a tolerance: "
             "values near it flip the rank by rounding (no gradient)", "s_min in singular value units"),
             TIE, _spell((_L, "matrix_rank", "linalg.matrix_rank"))),
):
    register(_op)
