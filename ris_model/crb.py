"""Cramer-Rao bound for the actual measurement model (Slepian-Bangs), in degrees and metres.

Model (docs/physics.md section 2): snapshot l is y_l ~ CN(0, C_l) with
    C_l = Phi_l R Phi_l^H + sigma^2 I_M,  Phi_l = H diag(c_l),  R = sum_k p_k a_k a_k^H
(a_k the unit-norm steering vector, p_k the actual, un-normalised source powers), independent over l.
Unknowns: (phi_k, theta_k, r_k) per source, plus the nuisance powers p_k and the noise power sigma^2.
Slepian-Bangs: F_ij = sum_l Re tr(C_l^-1 dC_l/d eta_i C_l^-1 dC_l/d eta_j); CRB = F^-1, whose diagonal
entries for (phi, theta, r) give the per-source standard deviations (nuisance parameters included, so
they are the bounds with unknown powers and noise). dC_l/d eta comes from forward-mode autograd of the
whole C_l(eta) in float64 (``torch.func.jacfwd``: one tangent per parameter).

Snapshot l uses code c_{l mod L_codes}, so ``snapshots`` may exceed the codebook: every added snapshot
adds a positive semi-definite term to F, and the bound can only decrease with more snapshots.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jacfwd

from ris_model.music import single_threaded
from ris_model.simulate import System


class CRBError(ValueError):
    """The Fisher information is singular or the inputs are inconsistent."""


def slepian_bangs_fim(cov_fn: Callable[[Tensor], Tensor], params: Tensor, counts: Tensor) -> Tensor:
    """Fisher information (P, P) of independent y_l ~ CN(0, C_l), C = cov_fn(params) (L, M, M).

    counts (L,): how many i.i.d. snapshots share covariance C_l (a weight on each term).
    """
    params = params.to(torch.float64)
    cov = cov_fn(params)
    with warnings.catch_warnings():
        # torch's forward-AD decompositions are registered with torch.jit.script on first use, which
        # torch itself deprecates; the warning is about torch internals and nothing we can act on.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        jac = jacfwd(lambda p: torch.view_as_real(cov_fn(p)))(params)  # (L, M, M, 2, P)
    dcov = torch.view_as_complex(jac.movedim(-1, 0).contiguous())  # (P, L, M, M)
    w = torch.linalg.solve(cov[None], dcov)  # C_l^-1 dC_l/d eta_i
    return torch.einsum("l,plab,qlba->pq", counts.to(w.dtype), w, w).real


def _code_counts(n_codes: int, snapshots: int) -> Tensor:
    """How many of ``snapshots`` snapshots use each code when they cycle through the codebook."""
    idx = torch.arange(n_codes)
    return (snapshots // n_codes + (idx < snapshots % n_codes)).to(torch.float64)


def crb(system: System, phi: Tensor, theta: Tensor, r: Tensor, powers: Tensor, noise_var: float | Tensor,
        snapshots: int | None = None, *, channel: Tensor | None = None, codes: Tensor | None = None
        ) -> dict[str, Tensor]:
    """CRB of one scene with K sources: phi, theta (radians), r (metres), powers (linear) all (K,).

    channel (M, N) and codes (L, N) default to the system's (pass a sample's own for per-sample
    channels); snapshots defaults to the number of codes. Returns float64 tensors: phi_deg,
    theta_deg (K,) standard deviations in degrees, r_m (K,) in metres, and the full ``fim`` and
    ``cov`` (= F^-1) over eta = (phi_1..K, theta_1..K, r_1..K, p_1..K, sigma^2).
    """
    h = (system.channel if channel is None else channel).to(torch.complex128)
    c = (system.codes if codes is None else codes).to(torch.complex128)
    snapshots = c.shape[0] if snapshots is None else snapshots
    k = phi.reshape(-1).shape[0]
    if not all(t.reshape(-1).shape[0] == k for t in (theta, r, powers)) or k == 0 or snapshots < 1:
        raise CRBError(f"crb: phi, theta, r, powers must all be (K,) with K >= 1 and snapshots >= 1; got "
                       f"{[tuple(t.shape) for t in (phi, theta, r, powers)]}, snapshots={snapshots}")
    counts = _code_counts(c.shape[0], snapshots)
    used = counts > 0
    phis = h[None] * c[used][:, None, :]  # (L_used, M, N): Phi_l = H diag(c_l)
    eye = torch.eye(h.shape[0], dtype=torch.complex128)

    def cov_fn(eta: Tensor) -> Tensor:
        a = system.steer(eta[:k], eta[k:2 * k], eta[2 * k:3 * k])  # (K, N)
        b = phis @ a.T  # (L, M, K): Phi_l a_k
        return (b * eta[3 * k:4 * k].to(b.dtype)) @ b.mH + eta[4 * k].to(b.dtype) * eye

    eta = torch.cat([t.reshape(-1).to(torch.float64) for t in (phi, theta, r, powers)]
                    + [torch.as_tensor(noise_var, dtype=torch.float64).reshape(1)])
    with single_threaded():
        fim = slepian_bangs_fim(cov_fn, eta, counts[used])
        chol, info = torch.linalg.cholesky_ex(fim)
        if int(info) != 0:
            raise CRBError(f"crb: the Fisher information ({fim.shape[0]} parameters) is singular or not "
                           f"positive definite (Cholesky failed at column {int(info)}); the parameters are "
                           "not identifiable. Likely cause: two sources at the same position, zero power, "
                           "or noise_var = 0. Check the scene.")
        cov = torch.cholesky_inverse(chol)
    std = cov.diagonal().sqrt()
    return {"phi_deg": torch.rad2deg(std[:k]), "theta_deg": torch.rad2deg(std[k:2 * k]),
            "r_m": std[2 * k:3 * k], "fim": fim, "cov": cov}


def crb_batch(batch: object, system: System) -> dict[str, Tensor]:
    """Per-source CRB standard deviations (B, K_MAX) for every scene of a Batch (or a ``simulate``
    dict with the same fields): keys phi_deg, theta_deg, r_m (float64; 0 in padded slots) and mask.

    Uses each sample's own channel, codes (L = codes.shape[1] snapshots) and noise_var.
    """
    get = (lambda name: batch[name]) if isinstance(batch, dict) else (lambda name: getattr(batch, name))
    mask = get("mask")
    out = {name: torch.zeros(mask.shape, dtype=torch.float64) for name in ("phi_deg", "theta_deg", "r_m")}
    for b in range(mask.shape[0]):
        m = mask[b]
        res = crb(system, get("phi")[b][m], get("theta")[b][m], get("r")[b][m], get("powers")[b][m],
                  get("noise_var")[b], channel=get("channel")[b], codes=get("codes")[b])
        for name in out:
            out[name][b, m] = res[name]
    out["mask"] = mask.clone()
    return out


def rms_bound(values: Tensor, mask: Tensor) -> float:
    """sqrt(mean CRB variance) over the masked sources: the bound an RMSE over them is compared to."""
    v = values[mask]
    return math.sqrt(float((v**2).mean())) if v.numel() else math.nan


__all__ = ["CRBError", "slepian_bangs_fim", "crb", "crb_batch", "rms_bound"]
