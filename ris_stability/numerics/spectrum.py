"""The statistics of sorted spectra as one table ``(..., len(STAT_KEYS))``, in a few dozen kernels.

:func:`eigen_table` (ascending eigenvalues, eigh order) and :func:`singular_table` (descending singular
values, svd order) compute what ``numerics.stats.eigen_stats`` / ``singular_stats`` return as a dict, as the
columns of one float64 tensor (columns in STAT_KEYS order; ``herm_err`` and the op hazards NaN unless
given). The probe measures every sampled call with them, so their cost is the monitor's cost per linear-
algebra site: on a CPU a small kernel costs a few microseconds whatever its size, so the statistics are
built from as few kernels as the definitions allow (three masked minima in one reduction, both cluster
ends in one gather, one stack, one poison), with no host synchronisation.

Definitions (identical for both; on singular values the gaps and clusters are taken on s^2, see
numerics.stats):

* ``rank``: entries above ``rank_tol(n, dtype, max)``; ``cond``: max/min, inf when min is within it;
  ``range_log10_cond``: log10(max / smallest entry above the tolerance), the conditioning of the matrix on
  its numerical range (finite for a matrix singular by design; NaN when rank is 0);
* ``min_gap``: smallest adjacent difference (NaN for n = 1); ``gap_split``: the difference between the
  largest noise and the smallest signal value; ``min_gap_signal`` / ``min_gap_noise``: within each part
  (NaN when the part has fewer than two values or ``k`` is unknown);
* ``max_cluster``: the longest run of adjacent values within the tie tolerance, counted in values;
  ``cluster_value``: the mid-point of the first longest run (NaN without a tie);
* a sample with a non-finite value has NaN everywhere except ``n``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ris_stability.numerics.tolerances import rank_tol, tie_tol

SPECTRUM_KEYS: tuple[str, ...] = (
    "n", "rank", "cond", "log10_cond", "range_log10_cond", "lambda_min", "lambda_max", "trace", "herm_err",
    "min_gap", "gap_split", "min_gap_signal", "min_gap_noise", "max_cluster", "cluster_value",
    "amplification",
)
# Hazards of particular ops (NaN for the others): eig/eigvals eigenvalue separation relative to scale and
# non-normality; pinv: decades between its cut-off and the nearest singular value.
HAZARD_KEYS: tuple[str, ...] = ("rel_sep", "non_normal", "cutoff_margin")
STAT_KEYS: tuple[str, ...] = SPECTRUM_KEYS + HAZARD_KEYS
# The keys eigen_stats / singular_stats return (the table's columns that come from the spectrum alone).
SORTED_KEYS: tuple[str, ...] = tuple(k for k in SPECTRUM_KEYS if k != "herm_err")

_F64 = torch.float64
_N_COLUMN: dict[torch.device, Tensor] = {}
_POSITIONS: dict[tuple[int, torch.device], Tensor] = {}


def _n_column(device: torch.device) -> Tensor:
    """(K,) bool, True only in the ``n`` column (the one a non-finite spectrum or matrix does not poison);
    cached: building it is a host-to-device copy."""
    mask = _N_COLUMN.get(device)
    if mask is None:
        mask = _N_COLUMN[device] = torch.tensor([key == "n" for key in STAT_KEYS], device=device)
    return mask


def poison_rows(table: Tensor, finite: Tensor) -> Tensor:
    """``table`` (..., K) with every column but ``n`` set to NaN in the rows where ``finite`` (...,) is False."""
    return torch.where(finite.unsqueeze(-1) | _n_column(table.device), table, math.nan)


def _positions(d: int, device: torch.device) -> Tensor:
    pos = _POSITIONS.get((d, device))
    if pos is None:
        pos = _POSITIONS[(d, device)] = torch.arange(d, device=device)
    return pos


def signal_split(k, batch_shape: torch.Size, n: int, device) -> Tensor | None:
    """Index of the first signal value in ascending order, n - k, clamped to [0, n]; None if unknown."""
    if k is None:
        return None
    if isinstance(k, Tensor):
        k_t = torch.broadcast_to(k.to(device=device, dtype=torch.long), batch_shape)
    else:  # a fill, not a host-to-device copy: statistics must not sync with the device
        k_t = torch.full(batch_shape, int(k), dtype=torch.long, device=device)
    return n - k_t.clamp(0, n)


def _split_gaps(diffs: Tensor, split: Tensor | None, nan: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(gap_split, min_gap_signal, min_gap_noise) of adjacent differences (..., d), d = n - 1."""
    if split is None:
        return nan, nan, nan
    j = _positions(diffs.shape[-1], diffs.device)
    s = split.unsqueeze(-1)
    # Difference j lies between values j and j + 1: the split pair is j = s - 1, signal pairs j >= s,
    # noise pairs j <= s - 2.
    masks = torch.stack([j == s - 1, j >= s, j <= s - 2])
    mins = torch.where(masks, diffs, math.inf).amin(-1)
    mins = torch.where(masks.any(-1), mins, math.nan)
    return mins.unbind(0)


def _clusters(values: Tensor, diffs: Tensor, tol: Tensor, nan: Tensor) -> tuple[Tensor, Tensor]:
    """(max_cluster, cluster_value) of ascending ``values`` (..., n) with differences ``diffs``."""
    tied = diffs <= tol.unsqueeze(-1)
    # Length of the run of tied pairs ending at each position: count since the last untied pair.
    count = torch.cumsum(tied, dim=-1)
    run = count - torch.cummax(torch.where(tied, 0, count), dim=-1).values
    longest, end = run.amax(-1), run.argmax(-1)  # amax + argmax, not max(dim): see site_stats
    # A run of L tied pairs ending at difference p spans values p + 1 - L .. p + 1.
    ends = values.gather(-1, torch.stack([end + 1, end + 1 - longest], dim=-1))
    middle = torch.where(longest > 0, ends.sum(-1) * 0.5, nan)
    return (longest + 1).to(_F64), middle


def _table(gap_values: Tensor, mags: Tensor, low: Tensor, high: Tensor, trace: Tensor, finite: Tensor,
           tie_scale: Tensor, big: Tensor, k, dtype: torch.dtype, herm_err: Tensor | None,
           cluster_sqrt: bool) -> Tensor:
    """The table from ascending ``gap_values`` (gaps and clusters) and ``mags`` (rank, cond)."""
    n = gap_values.shape[-1]
    nan = torch.full_like(low, math.nan)
    small = mags.amin(-1)
    rtol = rank_tol(mags.shape[-1], dtype, big)
    resolved = mags > rtol.unsqueeze(-1)
    rank = resolved.sum(-1).to(_F64)
    cond = torch.where(small <= rtol, math.inf, big / small)
    above = torch.where(resolved, mags, math.inf).amin(-1)
    range_cond = torch.where(rank > 0, torch.log10(big / above), math.nan)
    if n > 1:
        diffs = gap_values[..., 1:] - gap_values[..., :-1]
        min_gap = diffs.amin(-1)
        split, signal, noise = _split_gaps(diffs, signal_split(k, gap_values.shape[:-1], n, gap_values.device), nan)
        size, middle = _clusters(gap_values, diffs, tie_tol(n, dtype, tie_scale), nan)
        if cluster_sqrt:
            middle = middle.sqrt()
    else:
        min_gap = split = signal = noise = middle = nan
        size = torch.ones_like(low)
    columns = (torch.full_like(low, float(n)), rank, cond, torch.log10(cond), range_cond, low, high, trace,
               nan if herm_err is None else herm_err.to(_F64), min_gap, split, signal, noise, size, middle,
               min_gap.reciprocal(), nan, nan, nan)
    return poison_rows(torch.stack(columns, dim=-1), finite)


def eigen_table(eigvals: Tensor, k=None, dtype: torch.dtype | None = None, herm_err: Tensor | None = None) -> Tensor:
    """Statistics of real eigenvalues ``(..., n)`` sorted ASCENDING, as ``(..., len(STAT_KEYS))`` float64.
    ``dtype``: that of the matrix (sets the tolerances); ``herm_err``: its column, if measured."""
    with torch.no_grad():
        ev = eigvals.detach().to(_F64)
        mags = ev.abs()
        big = mags.amax(-1)
        # amax propagates NaN: the largest magnitude is below inf exactly when every eigenvalue is finite
        return _table(ev, mags, ev[..., 0], ev[..., -1], ev.sum(-1), big < math.inf, big, big, k,
                      dtype or eigvals.dtype, herm_err, cluster_sqrt=False)


def singular_table(svals: Tensor, k=None, dtype: torch.dtype | None = None) -> Tensor:
    """Statistics of singular values ``(..., r)`` sorted DESCENDING, as ``(..., len(STAT_KEYS))`` float64:
    rank, cond, extremes and trace (nuclear norm) on s; gaps, clusters and amplification on s^2 (the svd
    backward divides by s_j^2 - s_i^2), in s^2 units, with ``cluster_value`` back in units of s."""
    with torch.no_grad():
        s = svals.detach().to(_F64)
        mags = s.abs()
        big = mags.amax(-1)
        squares = torch.flip(s, dims=(-1,)).square()
        return _table(squares, mags, s[..., -1], s[..., 0], s.sum(-1), big < math.inf, big.square(),
                      big, k, dtype or svals.dtype, None, cluster_sqrt=True)


def columns(table: Tensor, keys: tuple[str, ...] = SORTED_KEYS) -> dict[str, Tensor]:
    """The named columns of a table, as (...,) views."""
    cols = table.unbind(-1)
    return {key: cols[STAT_KEYS.index(key)] for key in keys}
