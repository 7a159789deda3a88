"""Training/inference alignment: are the matrices the loss consumes the ones inference consumes?

The classic silent bug: the loss is computed on one matrix (say a predicted covariance) while inference runs its
estimator on another (a blended one). Training then optimises something inference never uses, and nothing
crashes. :func:`check_alignment` runs a training path and an inference path on the same batch, each under
a :class:`MatrixCapture` (a TorchFunctionMode, removed on exit; modules named by ris_stability.observe.tracker)
that records

- every input matrix of an allow-listed linear-algebra call (``instruments.probe.OPS``, from the op registry: eigh, svd, solve, ..., and
  functions marked ``__spectral_op__``, such as a custom eigh), and
- every square matrix a named *consumer* module (e.g. one loss term) reads without having produced it,
  so a term without linear algebra (a Frobenius-norm loss) is covered too,

and compares each training-side matrix with the inference-side linear-algebra inputs of the same shape:
the same object, or equal within the tolerance below, is aligned; anything else is a row of the table.

What is compared: matrices equal to a tensor of the batch are data (targets such as R_true), not
estimates, and are left out. A square training matrix with no inference counterpart of its shape is
listed in ``notes`` (rectangular ones, e.g. a QR of steering vectors, are compared only when inference
has one of the same shape); if nothing at all is comparable the check raises :class:`AlignmentError`.

Tolerance: ``||T - I||_F <= rtol ||I||_F`` per matrix, with default ``rtol = n * eps`` of the coarser of
the two dtypes (``tolerances.eig_abs_err(n, dtype, 1)``): two matrices closer than the backward error of
an eigensolver cannot be told apart by any linear-algebra consumer. Ranks use ``tolerances.rank_tol``.

Parts: ``alignment_capture`` (MatrixCapture: what is recorded), ``alignment_measure`` (differences, ranks,
tolerances), this module (pairing, naming, the result and its table).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ris_stability.instruments.alignment_capture import Captured, MatrixCapture, is_square_matrix, tensors_in
from ris_stability.instruments.alignment_measure import (coarse_dtype, default_rtol, numerical_rank, one_thread,
                                                         relative_difference, sample_difference)
from ris_stability.instruments.probe import OPS

SCHEMA = "risdiag.alignment/1"


class AlignmentError(RuntimeError):
    """The alignment check could not compare anything (no comparable matrices, a path failed)."""


@dataclass(frozen=True)
class AlignmentRow:
    """One training-side matrix against its closest inference-side linear-algebra input."""

    phase: str  # which training-side path ("train", "val", ...)
    consumer: str
    via: str
    location: str
    consumes: str  # name of the matrix the consumer reads
    inference_consumer: str
    inference_consumes: str
    rel_diff: float  # max over the batch of ||T - I||_F / ||I||_F
    rtol: float
    same_object: bool
    rank: int  # numerical rank (max over the batch, tolerance of the coarser dtype) of the consumed matrix
    inference_rank: int
    shape: tuple[int, ...]

    @property
    def aligned(self) -> bool:
        return self.same_object or self.rel_diff <= self.rtol


@dataclass(frozen=True)
class AlignmentResult:
    rows: tuple[AlignmentRow, ...]
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # misalignments found by other means (e.g. differing builder settings)

    @property
    def aligned(self) -> bool:
        return not self.problems and all(row.aligned for row in self.rows)

    def merge(self, other: AlignmentResult) -> AlignmentResult:
        return AlignmentResult(self.rows + other.rows, self.notes + other.notes, self.problems + other.problems)

    def to_dict(self) -> dict[str, Any]:
        rows = [{**dataclasses.asdict(row), "shape": list(row.shape), "aligned": row.aligned} for row in self.rows]
        return {"schema": SCHEMA, "aligned": self.aligned, "rows": rows, "notes": list(self.notes),
                "problems": list(self.problems)}

    def format_table(self) -> str:
        head = ("", "phase", "consumer", "via", "consumes", "inference consumes", "rel. diff", "rtol",
                "rank", "inf. rank")
        body = [("ok" if r.aligned else "MISALIGNED", r.phase, r.consumer, r.via, r.consumes,
                 f"{r.inference_consumes} @ {r.inference_consumer}", "same object" if r.same_object else f"{r.rel_diff:.3g}",
                 f"{r.rtol:.2g}", str(r.rank), str(r.inference_rank)) for r in self.rows]
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
        fmt = lambda line: "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, body)]
        verdict = "ALIGNED" if self.aligned else "MISALIGNED"
        lines += [f"problem: {p}" for p in self.problems] + [f"note: {n}" for n in self.notes]
        lines.append(f"verdict: {verdict} ({sum(not r.aligned for r in self.rows)} of {len(self.rows)} rows differ)")
        if any(not r.aligned for r in self.rows):
            lines.append("the MISALIGNED consumers train on a matrix inference never uses, so their loss does not "
                         "measure what inference does; make them read the inference matrix (same builder output)")
        return "\n".join(lines)


def _is_data(t: Tensor, data: list[Tensor]) -> bool:
    with torch.no_grad():
        return any(t is d or (d.shape == t.shape and bool(torch.equal(d.detach().to(t.dtype), t.detach())))
                   for d in data if d.is_floating_point() or d.is_complex())


Names = Mapping[str, "Tensor | Sequence[Tensor]"]


class _Namer:
    """Names a matrix by identity with a known tensor, else by equality within tolerance, else by shape."""

    def __init__(self, names: Names, rtol: float | None):
        self._names = {name: [refs] if isinstance(refs, Tensor) else list(refs) for name, refs in names.items()}
        self._rtol = rtol
        self._cache: dict[int, str] = {}  # the captured tensors stay alive during the check: ids are stable

    def _equal(self, t: Tensor, ref: Tensor) -> bool:
        tol = self._rtol if self._rtol is not None else default_rtol(t.shape[-1], coarse_dtype(t, ref))
        return ref.shape == t.shape and relative_difference(t, ref) <= tol

    def __call__(self, t: Tensor) -> str:
        if id(t) not in self._cache:
            self._cache[id(t)] = self._name(t)
        return self._cache[id(t)]

    def _name(self, t: Tensor) -> str:
        hits = [name for name, refs in self._names.items() if any(ref is t for ref in refs)]
        if not hits:
            hits = [name for name, refs in self._names.items() if any(self._equal(t, ref) for ref in refs)]
        return " = ".join(hits) if hits else f"unnamed {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _closest(t: Tensor, candidates: list[Captured], transforms: Mapping[str, Callable[[Tensor], Tensor]]):
    """(difference, transform label, inference record) of the inference matrix closest to ``t`` or to a
    declared inference-side transform of it; None when no candidate can be paired sample by sample."""
    options = [("", t)]
    with torch.no_grad():
        options += [(label, fn(t.detach())) for label, fn in transforms.items()]
    scored = []
    for c in candidates:
        if c.tensor is t:
            scored.append((0.0, "", c))
            continue
        for label, value in options:
            diff = sample_difference(value, c.tensor)
            if diff is not None:
                scored.append((diff, label, c))
    return min(scored, key=lambda x: (x[2].tensor is not t, x[0])) if scored else None


def _compare(phase: str, train: list[Captured], infer: list[Captured], data: list[Tensor], namer: _Namer,
             rtol: float | None, transforms: Mapping[str, Callable[[Tensor], Tensor]] = {}) -> AlignmentResult:
    rows, notes = [], []
    ranks: dict[tuple[int, torch.dtype], int] = {}

    def rank(t: Tensor, dtype: torch.dtype) -> int:
        key = (id(t), dtype)
        if key not in ranks:
            ranks[key] = numerical_rank(t, dtype)
        return ranks[key]

    for rec in train:
        t = rec.tensor
        if _is_data(t, data):
            continue
        candidates = [c for c in infer if c.tensor.shape[-2:] == t.shape[-2:]]
        closest = _closest(t, candidates, transforms) if candidates else None
        if closest is None and is_square_matrix(t):
            notes.append(f"{phase}: {rec.consumer} reads {namer(t)} of shape {tuple(t.shape)}, but inference feeds "
                         "no matrix of that matrix shape (per sample) to linear algebra; not compared")
        if closest is None:
            continue
        diff, label, best = closest
        coarse = coarse_dtype(t, best.tensor)
        tol = rtol if rtol is not None else default_rtol(t.shape[-1], coarse)
        rows.append(AlignmentRow(
            phase=phase, consumer=rec.consumer, via=rec.via, location=rec.location,
            consumes=f"{namer(t)} {label}" if label else namer(t),
            inference_consumer=best.consumer, inference_consumes=namer(best.tensor), rel_diff=diff, rtol=tol,
            same_object=best.tensor is t, rank=rank(t, coarse), inference_rank=rank(best.tensor, coarse),
            shape=tuple(t.shape)))
    return AlignmentResult(tuple(rows), tuple(notes))


def check_alignment(train_fn: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]],
                    infer_fn: Callable[[Any], Any], batch: Any, rtol: float | None = None, *,
                    roots: Mapping[str, nn.Module] | None = None,
                    consumers: Mapping[str, nn.Module] | None = None,
                    names: Names | Callable[[], Names] | None = None,
                    transforms: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
                    ) -> AlignmentResult:
    """Compare the matrices the training path(s) consume with those inference feeds to linear algebra.

    ``train_fn(batch)``: the forward and loss as in training (no backward needed); a mapping
    ``{phase: fn}`` checks several paths (e.g. training and validation) against one inference run.
    ``infer_fn(batch)``: the inference path. Put models in the mode you want compared (eval) first.
    ``rtol``: None for ``n * eps`` of the coarser dtype. ``roots``/``consumers``: see :class:`MatrixCapture`.
    ``names``: ``{name: tensor or tensors}`` of known matrices (or a function returning it, called after
    the runs) used to label captured ones, by identity first, then by equality within the tolerance.
    ``transforms``: declared inference-side transforms ``{label: fn}`` (e.g. ``{"+ 1e-3 I": lambda R: R +
    1e-3 * torch.eye(R.shape[-1])}``): a training matrix that matches inference only after one of them is
    aligned, and its label says which. Matrices are compared per sample: (1, N, N) against (N, N) pairs up.
    """
    paths = dict(train_fn) if isinstance(train_fn, Mapping) else {"train": train_fn}
    captured: dict[str, list[Captured]] = {}
    for phase, fn in [*paths.items(), ("<inference>", infer_fn)]:
        with MatrixCapture(roots, consumers if phase != "<inference>" else None) as cap:
            fn(batch)
        captured[phase] = cap.records
    infer = [rec for rec in captured.pop("<inference>") if is_square_matrix(rec.tensor)]
    if not infer:
        raise AlignmentError("check_alignment: the inference path fed no square matrix to linear algebra "
                             f"(allow-list: {', '.join(sorted({v[0] for v in OPS.values()}))}); there is nothing "
                             "to compare the loss matrices with. Check that infer_fn runs the estimator.")
    known = names() if callable(names) else dict(names or {})
    namer, data = _Namer(known, rtol), list(tensors_in(batch))
    result = AlignmentResult(())
    with one_thread():
        for phase, records in captured.items():
            result = result.merge(_compare(phase, records, infer, data, namer, rtol, dict(transforms or {})))
    if not result.rows:
        raise AlignmentError("check_alignment: no matrix the training path consumes has the shape of a matrix "
                             "inference feeds to linear algebra; nothing was compared.\n" + "\n".join(result.notes))
    return result


# Captured, MatrixCapture and the measurements are re-exported: ``alignment`` is the module users import.
__all__ = ["AlignmentError", "AlignmentResult", "AlignmentRow", "Captured", "MatrixCapture", "check_alignment",
           "default_rtol", "numerical_rank", "one_thread", "relative_difference", "sample_difference"]
