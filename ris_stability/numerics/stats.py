"""Pure, batched spectral statistics from eigenvalues (or singular values).

Every function works on a batch ``(..., n)`` and returns ``(...,)`` float64 tensors on the input's
device; nothing calls ``.item()`` except :func:`to_floats`, which syncs once for a whole dict.

Eigenvalue order: :func:`eigen_stats` takes eigenvalues ASCENDING (``torch.linalg.eigh`` order);
:func:`singular_stats` takes singular values DESCENDING (``torch.linalg.svd`` order). The signal
dimension ``k`` always means the top-k (largest) eigenvalues / singular values.

Why gaps, not the condition number, predict eigenvector-gradient blow-ups: the eigh backward is
``dA = V (diag(g_lambda) + skew(V^H g_V) / E) V^H`` with ``E_ij = lambda_j - lambda_i`` for EVERY pair
(i, j), whether or not the loss uses both vectors: a pair the loss ignores contributes 0/E_ij, which is
0 for a gap and 0/0 = NaN for an exact tie. So the bound on the amplification is 1 / (smallest gap over
all pairs), which for sorted eigenvalues is the smallest adjacent difference: ``amplification =
1 / min_gap``. The svd backward divides by ``s_j^2 - s_i^2`` instead, so singular-value gaps are taken
on the squares.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ris_stability.numerics.spectrum import (HAZARD_KEYS, SPECTRUM_KEYS, STAT_KEYS, columns, eigen_table,  # noqa: F401
                                         singular_table)
from ris_stability.numerics.tolerances import eps_of

# How each statistic is reduced to the worst case over a batch: these by their minimum, every other one
# by its maximum (cluster_value follows the largest cluster).
_WORST_MIN = frozenset({"rank", "lambda_min", "min_gap", "gap_split", "min_gap_signal", "min_gap_noise",
                        "rel_sep", "cutoff_margin"})

_STATS_DTYPE = torch.float64


class SpectrumError(ValueError):
    """The input to a statistics function has a shape or dtype the statistics cannot be defined on."""


def _check_spectrum(vals: Tensor, what: str) -> None:
    if vals.dim() < 1 or vals.shape[-1] < 1:
        raise SpectrumError(
            f"{what}: expected a (..., n) tensor with n >= 1, got shape {tuple(vals.shape)}; "
            "pass the eigenvalues/singular values of at least one 1x1 matrix"
        )
    if vals.is_complex():
        raise SpectrumError(
            f"{what}: got complex values of dtype {vals.dtype}; pass the real eigenvalues of a Hermitian "
            "matrix (torch.linalg.eigvalsh) or singular values (torch.linalg.svdvals)"
        )


def _poison(stats: dict[str, Tensor], bad: Tensor) -> dict[str, Tensor]:
    """NaN every statistic (except n) of the samples whose spectrum was not finite."""
    return {key: value if key == "n" else torch.where(bad, torch.full_like(value, math.nan), value)
            for key, value in stats.items()}


def eigen_stats(eigvals: Tensor, k: Tensor | int | None = None, dtype=None) -> dict[str, Tensor]:
    """Statistics of real eigenvalues ``(..., n)`` sorted ASCENDING (eigh order).

    ``k``: signal dimension (the top-k eigenvalues), an int or a tensor broadcastable to the batch shape;
    None when unknown (the split/signal/noise gaps are then NaN). ``dtype``: the dtype of the matrix the
    eigenvalues came from, which sets the tolerances (default: ``eigvals.dtype``).
    Returns the keys SORTED_KEYS (SPECTRUM_KEYS but ``herm_err``) as ``(...,)`` float64. ``cond`` is inf
    when the smallest |lambda| is within the rank tolerance; gaps undefined for the given n/k are NaN; a
    sample with a non-finite eigenvalue gets NaN everywhere except ``n``. Definitions: numerics.spectrum.
    """
    _check_spectrum(eigvals, "eigen_stats")
    dtype = eigvals.dtype if dtype is None else dtype
    eps_of(dtype)  # reject integer dtypes up front, with the ToleranceError message
    return columns(eigen_table(eigvals, k=k, dtype=dtype))


def singular_stats(svals: Tensor, k=None, dtype=None) -> dict[str, Tensor]:
    """Statistics of singular values ``(..., r)`` sorted DESCENDING (svd order).

    ``rank``, ``cond``, ``lambda_min`` (= s_min), ``lambda_max`` (= s_max) and ``trace`` (nuclear norm)
    are taken on s. Gaps, clusters and ``amplification`` are taken on s^2, in s^2 units, because the
    svd backward divides by ``s_j^2 - s_i^2``; ``cluster_value`` is reported back in units of s.
    ``k`` selects the top-k singular values as the signal.
    """
    _check_spectrum(svals, "singular_stats")
    dtype = svals.dtype if dtype is None else dtype
    eps_of(dtype)
    return columns(singular_table(svals, k=k, dtype=dtype))


def hermitian_error(A: Tensor) -> Tensor:
    """``||A - A^H||_F / ||A||_F`` per matrix of ``(..., n, n)``, float64; 0 for a zero matrix."""
    _check_square(A, "hermitian_error")
    with torch.no_grad():
        A = A.detach()
        num, den = _frobenius(A - A.mH), _frobenius(A)
        return torch.where(den == 0, 0.0, num / den)


def _frobenius(A: Tensor) -> Tensor:
    """Frobenius norm per matrix, as float64 (accumulated in the input's precision: 10x faster on CPU than
    accumulating in float64, and a ratio of two such norms needs no more)."""
    # The norm of the real view is the same number, ~100x faster on CPU than a complex vector_norm.
    if A.is_complex():
        return torch.linalg.vector_norm(torch.view_as_real(A), dim=(-3, -2, -1)).to(_STATS_DTYPE)
    return torch.linalg.vector_norm(A, dim=(-2, -1)).to(_STATS_DTYPE)


def _check_square(A: Tensor, what: str) -> None:
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise SpectrumError(
            f"{what}: expected square matrices (..., n, n), got shape {tuple(A.shape)}; "
            "use singular_stats(torch.linalg.svdvals(A)) for rectangular matrices"
        )


def matrix_stats(A: Tensor, k=None) -> dict[str, Tensor]:
    """All SPECTRUM_KEYS of square matrices ``(..., n, n)``: eigenvalues of the Hermitian part
    ``(A + A^H)/2`` plus ``herm_err`` of A itself. Runs under no_grad on ``A.detach()``. Matrices with a
    non-finite entry get NaN statistics (the eigensolver is not run on them)."""
    _check_square(A, "matrix_stats")
    eps_of(A.dtype)
    with torch.no_grad():
        A = A.detach()
        finite = torch.isfinite(A).all(-1).all(-1)
        herm = (A + A.mH) / 2
        # The solver may fail to converge on NaN/inf; those samples are reported as NaN below instead.
        herm = torch.where(finite[..., None, None], herm, torch.zeros_like(herm))
        stats = eigen_stats(torch.linalg.eigvalsh(herm), k=k, dtype=A.dtype)
        stats = _poison(stats, ~finite)
        stats["herm_err"] = hermitian_error(A)
        return {key: stats[key] for key in SPECTRUM_KEYS}


def _nan_reduce(value: Tensor, use_max: bool) -> Tensor:
    """Max/min over all entries ignoring NaN (an undefined gap); NaN only when every entry is NaN."""
    fill = -math.inf if use_max else math.inf
    filled = torch.where(torch.isnan(value), torch.full_like(value, fill), value)
    red = filled.amax() if use_max else filled.amin()
    return torch.where(torch.isnan(value).all(), torch.full_like(red, math.nan), red)


def worst(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Reduce each statistic over all batch entries to its worst case, as 0-d tensors.

    min for rank, lambda_min and gaps; max for n, cond, log10_cond, lambda_max, trace, herm_err,
    amplification and max_cluster; ``cluster_value`` is that of the sample with the largest cluster.
    NaN entries (undefined gaps) are ignored, but if any sample had a non-finite spectrum (NaN
    ``lambda_max``) every statistic except ``n`` is NaN: a broken matrix is the worst case.
    """
    flat = {key: value.detach().reshape(-1).to(_STATS_DTYPE) for key, value in stats.items()}
    out: dict[str, Tensor] = {}
    for key, value in flat.items():
        if key == "cluster_value" and "max_cluster" in flat:
            sizes = torch.where(torch.isnan(flat["max_cluster"]), -math.inf, flat["max_cluster"])
            # gather, not value[argmax]: indexing with a 0-d tensor calls .item() (a device sync).
            out[key] = value.gather(0, sizes.argmax().reshape(1)).reshape(())
        else:
            out[key] = _nan_reduce(value, use_max=key not in _WORST_MIN)
    if "lambda_max" in flat:
        broken = torch.isnan(flat["lambda_max"]).any()
        out = {key: value if key == "n" else torch.where(broken, torch.full_like(value, math.nan), value)
               for key, value in out.items()}
    return out


def worst_segments(rows: Tensor, segment: Tensor | None, count: int, keys: tuple[str, ...] = STAT_KEYS) -> Tensor:
    """:func:`worst` of the rows (R, K) of ``count`` groups at once (``segment`` (R,) gives each row's group,
    every group non-empty; None: row i is group i's only row): a (count, K) tensor, same rules as
    :func:`worst`, a fixed number of kernels."""
    rows = rows.detach().to(_STATS_DTYPE)
    is_min, keep, others = _column_masks(keys, rows.device)
    if rows.shape[0] == count:  # one row per group (a site called once): its worst case is itself
        red = rows if segment is None else torch.empty_like(rows).index_copy_(0, segment, rows)
        if "lambda_max" in keys:
            broken = torch.isnan(red[:, keys.index("lambda_max")]).unsqueeze(1)
            red = torch.where(broken & others, math.nan, red)
        return red
    nan = torch.isnan(rows)
    filled = torch.where(nan, torch.where(is_min, math.inf, -math.inf).to(rows.dtype), rows)
    index = segment.unsqueeze(1).expand_as(rows)
    shape = (count, rows.shape[1])
    hi = torch.full(shape, -math.inf, dtype=rows.dtype, device=rows.device).scatter_reduce(0, index, filled, "amax")
    lo = torch.full(shape, math.inf, dtype=rows.dtype, device=rows.device).scatter_reduce(0, index, filled, "amin")
    finite_count = torch.zeros(shape, dtype=rows.dtype, device=rows.device).index_add_(0, segment, (~nan).to(rows.dtype))
    red = torch.where(finite_count == 0, math.nan, torch.where(is_min, lo, hi))
    if "cluster_value" in keys and "max_cluster" in keys:
        mc, cv = keys.index("max_cluster"), keys.index("cluster_value")
        # The first row of its group holding the group's largest cluster, as argmax would pick.
        at_max = filled[:, mc] == hi[segment, mc]
        order = torch.arange(rows.shape[0], device=rows.device)
        first = torch.full((count,), rows.shape[0], dtype=torch.long, device=rows.device).scatter_reduce(
            0, segment, torch.where(at_max, order, rows.shape[0]), "amin")
        red[:, cv] = rows[:, cv].gather(0, first.clamp(max=rows.shape[0] - 1))
    if "lambda_max" in keys:
        broken = torch.zeros(count, dtype=rows.dtype, device=rows.device).index_add_(
            0, segment, nan[:, keys.index("lambda_max")].to(rows.dtype)) > 0
        red = torch.where(broken.unsqueeze(1) & ~keep, math.nan, red)
    return red


def worst_rows(rows: Tensor, keys: tuple[str, ...] = STAT_KEYS) -> Tensor:
    """:func:`worst` of statistics stacked as rows (R, K) with columns ``keys``: a (K,) tensor, computed
    for all columns at once (a dozen kernels whatever K), same rules as :func:`worst`."""
    rows = rows.detach().to(_STATS_DTYPE)
    is_min, keep, _ = _column_masks(keys, rows.device)
    nan = torch.isnan(rows)
    fill = torch.where(is_min, math.inf, -math.inf).to(rows.dtype)
    filled = torch.where(nan, fill, rows)
    red = torch.where(is_min, filled.amin(0), filled.amax(0))
    red = torch.where(nan.all(0), math.nan, red)
    if "cluster_value" in keys and "max_cluster" in keys:
        sizes = filled[:, keys.index("max_cluster")]
        col = rows[:, keys.index("cluster_value")]
        red = red.index_copy(0, _index(keys.index("cluster_value"), rows.device), col.gather(0, sizes.argmax().reshape(1)))
    if "lambda_max" in keys:
        broken = nan[:, keys.index("lambda_max")].any()
        red = torch.where(broken & ~keep, math.nan, red)
    return red


_MASKS: dict[tuple[tuple[str, ...], torch.device], tuple[Tensor, Tensor, Tensor]] = {}


def _column_masks(keys: tuple[str, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(min-reduced columns, the "n" column, every other column) as device masks; cached, because
    building them is a host-to-device copy, which on a GPU waits for the queue."""
    masks = _MASKS.get((keys, device))
    if masks is None:
        keep = torch.tensor([key == "n" for key in keys], device=device)
        masks = _MASKS[(keys, device)] = (torch.tensor([key in _WORST_MIN for key in keys], device=device),
                                          keep, ~keep)
    return masks


def _index(i: int, device) -> Tensor:
    return torch.full((1,), i, dtype=torch.long, device=device)


def to_floats(stats: dict[str, Tensor]) -> dict[str, float]:
    """Python floats of single-element statistics, with one device sync for the whole dict (one per
    device when the values live on several)."""
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for key, value in stats.items():
        value = torch.as_tensor(value)
        if value.numel() != 1:
            raise SpectrumError(
                f"to_floats: statistic '{key}' has shape {tuple(value.shape)}, expected one element; "
                "reduce the batch first with worst(stats)"
            )
        by_device.setdefault(value.device, []).append((key, value.detach().reshape(()).to(_STATS_DTYPE)))
    floats: dict[str, float] = {}
    for items in by_device.values():
        floats.update(zip((key for key, _ in items), torch.stack([v for _, v in items]).tolist()))
    return {key: floats[key] for key in stats}


def eig_stats(A: Tensor, w: Tensor | None = None) -> dict[str, Tensor]:
    """Hazards of a general eigendecomposition of square ``A (..., n, n)`` with eigenvalues ``w (..., n)``
    (computed when not given), float64 ``(...,)``:

    ``herm_err`` (a Hermitian input wants eigh: real sorted eigenvalues, no phase term in its backward);
    ``rel_sep`` = min_{i != j} |w_i - w_j| / max |w| (the eig backward divides by w_j - w_i; relative to
    the scale, since rounding is); ``non_normal`` = ||A A^H - A^H A||_F / ||A||_F^2 (0 for a normal
    matrix, whose eigenvectors are orthogonal; large values mean ill-conditioned eigenvectors, whose
    inverse the backward applies)."""
    _check_square(A, "eig_stats")
    with torch.no_grad():
        A = A.detach()
        if w is None:
            w = torch.linalg.eigvals(A)
        w = w.detach().to(torch.complex128)
        n = w.shape[-1]
        dist = (w.unsqueeze(-1) - w.unsqueeze(-2)).abs()
        off = ~torch.eye(n, dtype=torch.bool, device=w.device)
        gap = torch.where(off, dist, torch.full_like(dist, math.inf)).flatten(-2).amin(-1)
        scale = w.abs().amax(-1)
        rel = torch.where(scale > 0, gap / scale, torch.full_like(gap, math.nan))
        rel = torch.where(torch.isinf(rel), torch.full_like(rel, math.nan), rel)  # n = 1: no pair
        A64 = A.to(torch.complex128 if A.is_complex() else torch.float64)
        comm = _frobenius(_gram(A64, A64.mH) - _gram(A64.mH, A64))
        size = _frobenius(A64).square()
        non_normal = torch.where(size > 0, comm / size, torch.zeros_like(comm))
        return {"herm_err": hermitian_error(A), "rel_sep": rel, "non_normal": non_normal}


# Below this size a broadcast product beats a batched matmul: torch's CPU bmm of many tiny matrices
# pays a thread-pool round trip per call (measured 30 ms for 16 8x8 products on 2 busy threads).
_BROADCAST_MATMUL_N = 32


def _gram(X: Tensor, Y: Tensor) -> Tensor:
    if X.shape[-1] <= _BROADCAST_MATMUL_N:
        return (X.unsqueeze(-1) * Y.unsqueeze(-3)).sum(-2)
    return X @ Y


def pinv_cutoff_margin(svals: Tensor, m: int, n: int, dtype: torch.dtype, rtol: float | None = None,
                       atol: float = 0.0) -> Tensor:
    """Decades between torch.linalg.pinv's cut-off and the nearest singular value, float64 ``(...,)``.

    pinv drops singular values at or below ``max(atol, rtol * s_max)`` (default rtol ``max(m, n) * eps``
    when neither is given) and inverts the rest: a singular value near the cut-off is a coin flip
    between dropped (0) and kept (1/s, the largest term of the result). A margin under one decade is
    that hazard; a singular value far below the cut-off is dropped safely and far above kept safely."""
    with torch.no_grad():
        s = svals.detach().to(_STATS_DTYPE)
        rtol = max(m, n) * eps_of(dtype) if rtol is None else rtol
        cut = torch.clamp(s.amax(-1) * rtol, min=atol)
        ratio = torch.where(s > 0, s / cut.unsqueeze(-1), torch.zeros_like(s))
        margin = torch.log10(ratio).abs().amin(-1)
        return torch.where(cut > 0, margin, torch.full_like(margin, math.nan))


def eig_backward_terms(w: Tensor, V: Tensor, gV: Tensor) -> tuple[Tensor, Tensor]:
    """The two parts of torch's eig backward for eigenvalues ``w (..., n)``, eigenvectors ``V`` and their
    gradient ``gV``, in the precision of the op, as float64 ``(...,)``: the largest |Im diag(V^H gV)|,
    which the backward keeps undivided and which is exactly 0 for a loss invariant to each eigenvector's
    phase (so what is measured is rounding), and the largest off-diagonal |(V^H gV)_ij / (w_j - w_i)|,
    the true eigenvector terms. Noise above a fraction of the terms means the gradient is rounding."""
    with torch.no_grad():
        VhgV = _gram(V.detach().mH, gV.detach())
        E = (w.detach().unsqueeze(-2) - w.detach().unsqueeze(-1)).conj()
        off = ~torch.eye(w.shape[-1], dtype=torch.bool, device=w.device)
        noise = VhgV.diagonal(dim1=-2, dim2=-1).imag.abs().amax(-1).to(_STATS_DTYPE)
        terms = torch.where(off, (VhgV / torch.where(off, E, torch.ones_like(E))).abs(),
                            torch.zeros_like(E.real)).flatten(-2).amax(-1).to(_STATS_DTYPE)
        return noise, terms
