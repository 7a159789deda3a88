"""Information-criterion estimates of the number of sources (MDL, AIC), the classical baseline of the K head.

Wax & Kailath (1985): for the eigenvalues l_1 >= ... >= l_p of a sample covariance of n snapshots,
    Lik(k) = n (p - k) ln(a_k / g_k)          a_k, g_k: arithmetic and geometric mean of l_{k+1..p}
    MDL(k) = Lik(k) + k (2p - k) ln(n) / 2     AIC(k) = 2 Lik(k) + 2 k (2p - k)
and K = argmin over k. Both assume that the p - K smallest eigenvalues estimate one common noise power.

Validity here (L < N): R_samp has rank <= L (one rank-1 term per snapshot), so its trailing N - L
eigenvalues are structurally zero, not sigma^2; a geometric mean over them is 0 and the criteria break.
They are therefore applied to the top p = ``rank`` eigenvalues only (p = L for R_samp), i.e. to the range
of the matrix, with n = L snapshots. Even then two assumptions remain violated and the figures show it:
with n = p the noise eigenvalues of a sample covariance spread (Marchenko-Pastur) instead of being
equal, and the back-projected snapshots are not identically distributed (each sees another 16-dimensional
slice of the field). The estimate is confined to k in [1, k_max] (every scene holds at least one source).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ris_model.numerics import eps_of


class ModelOrderError(ValueError):
    """Bad arguments to an information criterion (rank, k_max, snapshots)."""


def information_criteria(eigvals_ascending: Tensor, n_snapshots: int, rank: int, k_max: int
                         ) -> dict[str, Tensor]:
    """MDL and AIC values (B, k_max) for k = 1..k_max from eigenvalues (B, N) ascending; see the docstring."""
    n_eig = eigvals_ascending.shape[-1]
    if not 1 <= k_max < rank <= n_eig or n_snapshots < 1:
        raise ModelOrderError(f"information criteria: need 1 <= k_max ({k_max}) < rank ({rank}) <= N ({n_eig}) "
                              f"and n_snapshots >= 1 (got {n_snapshots}); rank is the number of structurally "
                              "non-zero eigenvalues (L for R_samp)")
    lam = eigvals_ascending.flip(-1)[..., :rank].to(torch.float64)
    # Rounding can leave the smallest in-range eigenvalue at or below 0: floor at the eigensolver resolution.
    lam = lam.clamp_min(rank * eps_of(eigvals_ascending.dtype) * float(lam.abs().max()) + 1e-300)
    k = torch.arange(1, k_max + 1, dtype=torch.float64)
    log_lam = lam.log()
    # Tail sums over l_{k+1..p} for k = 1..k_max (suffix sums of the descending eigenvalues).
    tail_sum = lam.flip(-1).cumsum(-1).flip(-1)[..., 1:k_max + 1]
    tail_log = log_lam.flip(-1).cumsum(-1).flip(-1)[..., 1:k_max + 1]
    m = rank - k
    lik = n_snapshots * m * (torch.log(tail_sum / m) - tail_log / m)
    free = k * (2 * rank - k)
    return {"mdl": lik + 0.5 * free * math.log(n_snapshots), "aic": 2 * lik + 2 * free}


def estimate_k_ic(eigvals_ascending: Tensor, n_snapshots: int, rank: int, k_max: int,
                  kind: Literal["mdl", "aic"] = "mdl") -> Tensor:
    """K (B,) int64 in [1, k_max] minimising MDL or AIC (see the module docstring for validity)."""
    if kind not in ("mdl", "aic"):
        raise ModelOrderError(f"information criterion {kind!r} unknown; valid: mdl, aic")
    return information_criteria(eigvals_ascending, n_snapshots, rank, k_max)[kind].argmin(-1) + 1


# --------------------------------------------------------------------------- on the ML residuals
#
# The nested measurement-domain ML fits (``ml_estimator``) give residual energies e_0 >= e_1 >= ... >= e_kmax
# with e_k = sum_l ||P_perp(B_l) y_l||^2. The noise n_l ~ CN(0, sigma^2 I_M) is white in the measurement
# domain, so once k >= K the residual is noise alone: e_k ~ sigma^2 chi^2 with L (M - k) complex degrees of
# freedom (less what the fitted spurious sources absorb), a genuine noise plateau - which the eigenvalues of
# R_samp never show (docs/physics.md, "Model order").


def mdl_residual(energy: Tensor, snapshots: int, antennas: int) -> Tensor:
    """K (B,) in [1, k_max] minimising the deterministic-signal MDL of the nested ML fits (Wax 1991):
        MDL(k) = L M ln e_k + (k (3 + 2 L) / 2) ln(2 L M)
    (concentrated Gaussian log-likelihood of the L M complex measurements; each source brings 3 position
    parameters and L complex symbols). energy (B, k_max + 1) holds e_0..e_kmax."""
    if energy.ndim != 2 or energy.shape[-1] < 2:
        raise ModelOrderError(f"mdl_residual: energy must be (B, k_max + 1) with k_max >= 1, got {tuple(energy.shape)}")
    k = torch.arange(energy.shape[-1], dtype=torch.float64)
    n_obs = snapshots * antennas
    mdl = n_obs * energy.to(torch.float64).log() + 0.5 * k * (3 + 2 * snapshots) * math.log(2 * n_obs)
    return mdl[:, 1:].argmin(-1) + 1


def residual_drop(energy: Tensor, snapshots: int, antennas: int) -> Tensor:
    """F-like statistic of each added source (B, k_max): (e_{k-1} - e_k) / (e_k / (L (M - k))), the energy
    the k-th source removed over the per-degree-of-freedom residual: about L once k > K (a spurious source
    absorbs one noise degree of freedom per snapshot through its symbol, plus what its position fits), and
    much larger while k <= K."""
    k = torch.arange(1, energy.shape[-1], dtype=torch.float64)
    e = energy.to(torch.float64)
    dof = snapshots * (antennas - k).clamp_min(1)
    return (e[:, :-1] - e[:, 1:]) / (e[:, 1:] / dof)


def threshold_k(energy: Tensor, snapshots: int, antennas: int, tau: float) -> Tensor:
    """K (B,) in [1, k_max]: sources are added while their ``residual_drop`` exceeds ``tau`` (the greedy-
    residual threshold; ``tau`` is tuned on validation scenes, ``benchmark.tune_threshold``)."""
    above = residual_drop(energy, snapshots, antennas) > tau
    run = above.to(torch.int64).cumprod(-1).sum(-1)  # consecutive sources above the threshold
    return run.clamp_min(1)


__all__ = ["ModelOrderError", "information_criteria", "estimate_k_ic", "mdl_residual", "residual_drop", "threshold_k"]
