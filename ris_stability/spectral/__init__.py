"""ris_stability.spectral: gap-aware eigh and SVD backwards, and the one-line switch ``gap_aware()``.

A leaf op library (torch only, no instrument state): the showcase pipeline imports it like any user would, and
it takes THE tie rule and eps_of from ris_stability.numerics.tolerances (pure torch) and re-exports them.

* ``eigh_gap_aware`` / ``svd_gap_aware`` / ``svd_old_gap_aware``: drop-ins for ``torch.linalg.eigh`` /
  ``torch.linalg.svd`` / ``torch.svd`` with torch's forward (bit-identical) and a backward that drops
  pairs tied within the rounding of the solver and broadens near ones (``eigh``/``svd`` are aliases);
* ``eigvalsh`` / ``svdvals``: torch's, unchanged (their backward is finite for any spectrum);
* ``gap_aware()``: a context manager that swaps the gap-aware backward into torch's spellings;
* ``tie_rtol``: THE tie rule; ``pair_weights`` / ``lorentz``: the weights the backwards use.

Rules and error bounds: rule.py (tie rule, Lorentzian), eigh.py and svd.py (what the backward drops).
"""
from ris_stability.spectral.context import gap_aware, is_active
from ris_stability.spectral.eigh import EighGapAware, eigh_gap_aware, eigvalsh
from ris_stability.spectral.rule import (PHASE_INVARIANCE_ATOL, TIE_MIN_N, TIE_SPREAD, PhaseDependenceError,
                                         SpectralArgumentError, eps_of, lorentz, pair_weights, real_dtype_of,
                                         tie_rtol, tiny_of)
from ris_stability.spectral.svd import SvdGapAware, svd_gap_aware, svd_old_gap_aware, svdvals

eigh = eigh_gap_aware
svd = svd_gap_aware

__all__ = ["EighGapAware", "PHASE_INVARIANCE_ATOL", "PhaseDependenceError", "SpectralArgumentError", "SvdGapAware",
           "TIE_MIN_N", "TIE_SPREAD", "eigh", "eigh_gap_aware", "eigvalsh", "eps_of", "gap_aware", "is_active",
           "lorentz", "pair_weights", "real_dtype_of", "svd", "svd_gap_aware", "svd_old_gap_aware", "svdvals",
           "tie_rtol", "tiny_of"]
