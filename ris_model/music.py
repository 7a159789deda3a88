"""2.5-D near-field MUSIC: signal subspace, grid spectrum, 3-D peaks, continuous refinement, K estimate.

Spectrum (docs/physics.md section 4): P(phi, theta, r) = 1 / q with the null spectrum
q = 1 - ||E_s^H a||^2 for the unit-norm steering vector a (``geometry.steering`` through
``System.steer``) and the K top eigenvectors E_s. q equals ||E_n^H a||^2 but needs only K vectors.
E_s^H a uses the conjugate transpose; a^T-style forms put the peaks elsewhere (tests plant that bug).

Pipeline of ``music``: eigh in complex128 (eigenvalues ascending) -> K (given, or ``estimate_k``) ->
q on the search grid in complex64, chunked over grid points, each steering chunk computed once and
projected on the subspaces of the whole batch with one GEMM -> 3-D local minima of q (3x3x3
neighbourhood), greedy non-maximum suppression in physical units (angular distance in degrees AND
|ln(r_i / r_j)|) -> the 2K deepest -> damped Newton on (phi, theta, ln r) of q in float64 with
autograd gradient and Hessian, clamped to the search box -> re-ranked by refined q -> NMS -> top K.

Memory: the spectrum of one group of at most ``GROUP`` scenes (GROUP * grid points * 4 bytes, 360 MB
for 128 scenes on the default 0.5 deg x 0.5 deg x 24 grid) plus chunk temporaries of about
``CHUNK_BYTES`` times a small factor.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ris_model.config import MusicConfig, SceneConfig
from ris_model.geometry import direction, search_grid, steering
from ris_model.numerics import eps_of
from ris_model.simulate import System

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20  # complex64 steering block + projections per grid chunk
GROUP = 128  # scenes whose spectra are held at once (bounds memory; steering is reused inside a group)
CANDIDATES_PER_SOURCE = 16  # local maxima kept per source slot before non-maximum suppression
REFINE_TOL = 1e-10  # a point stops refining once its move (radians, ln metres) is below this


class MusicError(ValueError):
    """Invalid input to MUSIC (shapes, K out of range, non-finite covariance)."""


@dataclass(frozen=True)
class Estimates:
    """MUSIC output. phi, theta radians; r metres; all (B, K_MAX) float64; mask (B, K_MAX) marks
    the filled slots (deepest refined null spectrum first); k (B,) int64 = mask.sum(-1)."""

    phi: Tensor
    theta: Tensor
    r: Tensor
    mask: Tensor
    k: Tensor


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run small dense factorisations (144 x 144 eigh, 16 x 16 solves) on one thread.

    MKL's threaded zheevd gains nothing at these sizes and, when the cores are shared with other
    processes, its spinning threads slow a batch of 32 eigh calls from ~0.1 s to 6-13 s (measured on
    the 2-core dev machine). The previous thread count is restored on exit.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


# --------------------------------------------------------------------------- subspace and K

def estimate_k(eigvals_ascending: Tensor, k_max: int, rel_floor: float | None = None) -> Tensor:
    """Number of sources from the eigenvalues (B, N) of a trace-normalised covariance, ascending.

    Rule (largest eigenvalue ratio): with lambda_1 >= ... >= lambda_{k_max+1} the top k_max + 1
    eigenvalues, each floored at ``rel_floor * lambda_1`` (default N * eps(dtype), the resolution of a
    Hermitian eigensolver), K = argmax_{k in 1..k_max} lambda_k / lambda_{k+1}.

    Validity: it uses only the top k_max + 1 eigenvalues, so it never relies on the noise eigenvalues
    being equal (MDL/AIC do, and that fails here: R_samp has rank <= L < N and its trailing N - L
    eigenvalues are zero, not sigma^2). It needs lambda_{k_max+1} to be a genuine noise/leakage
    eigenvalue, i.e. rank(R) >= k_max + 1: for R_samp that requires L > k_max (L = 16 > 5 by default);
    with L <= k_max the floored zeros make the ratio peak at k = L whatever the truth. On a noise-free
    R_true (rank K) it is exact as long as lambda_K stays above the floor.
    """
    n = eigvals_ascending.shape[-1]
    if not 1 <= k_max < n:
        raise MusicError(f"estimate_k: k_max={k_max} must be in [1, N-1={n - 1}]")
    lam = eigvals_ascending.flip(-1)[..., : k_max + 1]
    floor = (n * eps_of(lam.dtype) if rel_floor is None else rel_floor) * lam[..., :1].clamp_min(0)
    lam = torch.maximum(lam, floor).clamp_min(torch.finfo(lam.dtype).tiny)
    ratio = lam[..., :-1] / lam[..., 1:]
    return ratio.argmax(-1) + 1


def signal_subspace(R: Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """eigh of R in complex128: eigenvalues (B, N) ascending and the top k_max eigenvectors
    (B, N, k_max), strongest first."""
    if R.ndim != 3 or R.shape[-1] != R.shape[-2]:
        raise MusicError(f"MUSIC: R must be (B, N, N), got shape {tuple(R.shape)}")
    if not bool(torch.isfinite(R).all()):
        bad = (~torch.isfinite(R)).reshape(R.shape[0], -1).any(-1).nonzero().reshape(-1)[:5].tolist()
        raise MusicError(f"MUSIC: R holds non-finite values in batch item(s) {bad}; MUSIC needs a finite "
                         "covariance. Check the network outputs / the covariance builder for that sample.")
    with single_threaded():
        evals, evecs = torch.linalg.eigh(R.to(torch.complex128))
    return evals, evecs[..., -k_max:].flip(-1)


# --------------------------------------------------------------------------- spectrum

def _chunk_points(n: int, n_cols: int) -> int:
    return max(1024, CHUNK_BYTES // (8 * (n + n_cols)))


def null_spectrum(Es: Tensor, system: System, phi: Tensor, theta: Tensor, r: Tensor) -> Tensor:
    """q = 1 - ||E_s^H a||^2 at G points; Es (B, N, K) orthonormal columns (zero columns allowed for
    unused slots); phi, theta, r (G,) in the precision the spectrum is computed in. Returns (B, G).

    Each steering chunk is computed once and projected on the subspaces of all B scenes with one
    GEMM against the non-zero columns only; a second, small real GEMM with a 0/1 owner matrix sums
    the squared magnitudes per scene and writes them already transposed (measured: ~1.7x faster than
    an index_add or per-group reductions, which are memory-bound passes over the projections).
    """
    b, n, _ = Es.shape
    positions = system.positions.to(phi.dtype)
    cols_mask = Es.abs().amax(-2) > 0  # (B, K): which columns are in use (unused slots are zero)
    owner = torch.arange(b).repeat_interleave(cols_mask.sum(-1))
    cdtype = torch.complex64 if phi.dtype == torch.float32 else torch.complex128
    cols = Es.transpose(-1, -2)[cols_mask].to(cdtype)  # (C, N)
    cols_h = cols.conj().T.contiguous()  # (N, C): a @ cols_h = (e_c^H a) for every column c
    # (B, 2C): row b has ones at the (real, imag) entries of scene b's columns
    select = (owner[None, :] == torch.arange(b)[:, None]).to(phi.dtype).repeat_interleave(2, dim=1)
    g = phi.shape[0]
    out = torch.empty(b, g, dtype=phi.dtype)
    step = _chunk_points(n, cols.shape[0])
    for start in range(0, g, step):
        sl = slice(start, min(start + step, g))
        a = steering(positions, system.wavelength, phi[sl], theta[sl], r[sl], fresnel=system.fresnel)
        parts = torch.view_as_real(a @ cols_h).reshape(a.shape[0], -1)  # (G_chunk, 2C): Re, Im of e_c^H a
        energy = select @ parts.square_().T  # (B, G_chunk): ||E_s^H a||^2 per scene
        out[:, sl] = energy.neg_().add_(1.0)
    return out


def music_spectrum(Es: Tensor, system: System, phi: Tensor, theta: Tensor, r: Tensor) -> Tensor:
    """P = 1 / (1 - ||E_s^H a||^2) for Es (B, N, K) and points phi, theta (radians), r (metres) that
    broadcast to a shape S; returns (B, *S) in the points' precision.

    q is a squared norm of a projection on the noise subspace, >= 0 in exact arithmetic; rounding can
    push it to or just below 0 at an exact peak, so it is floored at eps(dtype) (the resolution of
    1 - ||.||^2), which caps P at 1 / eps instead of producing an infinite or negative peak.
    """
    phi, theta, r = torch.broadcast_tensors(phi, theta, r)
    shape = phi.shape
    q = null_spectrum(Es, system, phi.reshape(-1), theta.reshape(-1), r.reshape(-1))
    return 1.0 / q.clamp_min(eps_of(q.dtype)).reshape(Es.shape[0], *shape)


# --------------------------------------------------------------------------- peaks

def _grid_points(grid: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    ph, th, rr = torch.meshgrid(*grid, indexing="ij")
    return ph.reshape(-1), th.reshape(-1), rr.reshape(-1)


def _max3(x: Tensor, dim: int) -> Tensor:
    """Running max over windows of 3 along ``dim``, -inf beyond the edges (same shape as x)."""
    pad = torch.full_like(x.narrow(dim, 0, 1), -math.inf)
    p = torch.cat([pad, x, pad], dim=dim)
    n = x.shape[dim]
    return torch.maximum(torch.maximum(p.narrow(dim, 0, n), p.narrow(dim, 1, n)), p.narrow(dim, 2, n))


def _nms(phi: Tensor, theta: Tensor, r: Tensor, valid: Tensor, cfg: MusicConfig) -> Tensor:
    """Greedy NMS over candidates (B, C) sorted best first: a candidate is dropped when a kept, better
    one lies within cfg.nms_deg (angular distance) AND within cfg.nms_range_frac in |ln(r_i / r_j)|."""
    u = direction(phi, theta)
    cos = (u @ u.transpose(-1, -2)).clamp(-1.0, 1.0)
    close = (torch.rad2deg(torch.arccos(cos)) < cfg.nms_deg) & (
        (r.log()[..., :, None] - r.log()[..., None, :]).abs() < cfg.nms_range_frac)
    keep = torch.zeros_like(valid)
    for i in range(valid.shape[-1]):
        suppressed = (keep[:, :i] & close[:, :i, i]).any(-1)
        keep[:, i] = valid[:, i] & ~suppressed
    return keep


def _first_kept(values: list[Tensor], keep: Tensor, n: Tensor, slots: int) -> tuple[list[Tensor], Tensor]:
    """The first n[b] kept entries of each row, packed into (B, slots) tensors (order preserved)."""
    b = keep.shape[0]
    rank = keep.cumsum(-1) - 1
    take = keep & (rank < n[:, None])
    rows, cols = take.nonzero(as_tuple=True)
    dst = rank[rows, cols]
    out = []
    for v in values:
        o = torch.zeros(b, slots, dtype=v.dtype)
        o[rows, dst] = v[rows, cols]
        out.append(o)
    mask = torch.zeros(b, slots, dtype=torch.bool)
    mask[rows, dst] = True
    return out, mask


def find_peaks(q: Tensor, grid: tuple[Tensor, Tensor, Tensor], n: Tensor, slots: int,
               cfg: MusicConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The n[b] deepest 3-D local minima of q (B, n_phi * n_theta * n_r) that survive NMS:
    phi, theta, r (B, slots) float64 and a mask (B, slots), deepest first."""
    b = q.shape[0]
    shape = tuple(ax.shape[0] for ax in grid)
    score = -q.reshape(b, *shape)
    pooled = _max3(_max3(_max3(score, 1), 2), 3)  # 3x3x3 max, separable: 3x faster than max_pool3d
    score = torch.where(score >= pooled, score, torch.full_like(score, -math.inf)).reshape(b, -1)
    top, idx = score.topk(min(score.shape[-1], CANDIDATES_PER_SOURCE * slots), dim=-1)
    pts = [p.to(torch.float64)[idx] for p in _grid_points(grid)]
    keep = _nms(*pts, valid=torch.isfinite(top), cfg=cfg)
    (phi, theta, r), mask = _first_kept(pts, keep, n, slots)
    r[~mask] = 1.0  # padded slots: a harmless finite range
    return phi, theta, r, mask


# --------------------------------------------------------------------------- refinement

def _null_at(x: Tensor, Es: Tensor, system: System) -> Tensor:
    """q at points x (P, 3) = (phi, theta, ln r) for per-point subspaces Es (P, N, K), float64."""
    a = system.steer(x[:, 0], x[:, 1], x[:, 2].exp())
    proj = torch.einsum("pnk,pn->pk", Es.conj(), a)  # e_k^H a
    return 1.0 - torch.view_as_real(proj).square().sum((-1, -2))


def _value_grad_hessian(x: Tensor, Es: Tensor, system: System) -> tuple[Tensor, Tensor, Tensor]:
    """q, its gradient (P, 3) and Hessian (P, 3, 3); points are independent, so the gradient of a
    sum gives every per-point gradient and one more backward per coordinate gives the Hessian rows."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = _null_at(x, Es, system)
        (g,) = torch.autograd.grad(f.sum(), x, create_graph=True)
        rows = [torch.autograd.grad(g[:, i].sum(), x, retain_graph=i < 2)[0] for i in range(3)]
    return f.detach(), g.detach(), torch.stack(rows, dim=-2)


def _newton_step(g: Tensor, h: Tensor, mu: Tensor, trust: Tensor) -> Tensor:
    """Saddle-free damped Newton step -(|H| + mu I)^-1 g, scaled down to fit the trust box."""
    lam, v = torch.linalg.eigh(0.5 * (h + h.transpose(-1, -2)))
    scale = lam.abs().amax(-1, keepdim=True)
    denom = lam.abs().clamp_min(1e-12 * scale + torch.finfo(lam.dtype).tiny) + mu[:, None]
    step = -(v @ ((v.transpose(-1, -2) @ g[..., None])[..., 0] / denom)[..., None])[..., 0]
    over = (step.abs() / trust).amax(-1, keepdim=True).clamp_min(1.0)
    return step / over


def _box(scene: SceneConfig, cfg: MusicConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Search box (lo, hi) in (phi, theta, ln r) and the trust box: one grid step per coordinate."""
    lo = torch.tensor([math.radians(scene.phi_deg[0]), math.radians(scene.theta_deg[0]),
                       math.log(scene.range_m[0])], dtype=torch.float64)
    hi = torch.tensor([math.radians(scene.phi_deg[1]), math.radians(scene.theta_deg[1]),
                       math.log(scene.range_m[1])], dtype=torch.float64)
    dlnr = math.log(scene.range_m[1] / scene.range_m[0]) / max(cfg.n_range - 1, 1) or 0.1
    trust = torch.tensor([math.radians(cfg.phi_step_deg), math.radians(cfg.theta_step_deg), dlnr],
                         dtype=torch.float64)
    return lo, hi, trust


def refine(phi: Tensor, theta: Tensor, r: Tensor, mask: Tensor, Es: Tensor, system: System,
           scene: SceneConfig, cfg: MusicConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Minimise q over (phi, theta, ln r) from each masked start (B, S), in float64, inside the search
    box. A step is accepted only if q does not increase; a rejected one raises the Levenberg damping.
    A point stops once its move is below REFINE_TOL. Returns phi, theta, r and q there (B, S)."""
    bi, si = mask.nonzero(as_tuple=True)
    es = Es[bi]  # (P, N, K) complex128
    x = torch.stack([phi[bi, si], theta[bi, si], r[bi, si].log()], dim=-1)
    lo, hi, trust = _box(scene, cfg)
    mu = torch.zeros(x.shape[0], dtype=torch.float64)
    active = torch.ones(x.shape[0], dtype=torch.bool)
    iters = 0
    with single_threaded():
        f_all = _null_at(x, es, system)
        while iters < cfg.refine_iters and bool(active.any()):
            iters += 1
            idx = active.nonzero().reshape(-1)
            f, g, h = _value_grad_hessian(x[idx], es[idx], system)
            x_new = torch.minimum(torch.maximum(x[idx] + _newton_step(g, h, mu[idx], trust), lo), hi)
            f_new = _null_at(x_new, es[idx], system)
            ok = f_new <= f
            moved = (x_new - x[idx]).abs().amax(-1)
            x[idx] = torch.where(ok[:, None], x_new, x[idx])
            f_all[idx] = torch.where(ok, f_new, f)
            mu[idx] = torch.where(ok, 0.1 * mu[idx], torch.maximum(10 * mu[idx],
                                                                  1e-3 * torch.linalg.matrix_norm(h, ord=2)))
            active[idx[moved < REFINE_TOL]] = False
    logger.debug("refine: %d points, %d iterations, %d not converged", x.shape[0], iters, int(active.sum()))
    out = [torch.zeros_like(phi), torch.zeros_like(theta), torch.ones_like(r), torch.full_like(r, math.inf)]
    for o, v in zip(out, (x[:, 0], x[:, 1], x[:, 2].exp(), f_all)):
        o[bi, si] = v
    return out[0], out[1], out[2], out[3]


# --------------------------------------------------------------------------- the estimator

def _check_k(k: Tensor, b: int, k_max: int) -> Tensor:
    k = torch.as_tensor(k).to(torch.int64).reshape(-1)
    if k.shape[0] != b or bool(((k < 0) | (k > k_max)).any()):
        raise MusicError(f"MUSIC: k must be (B={b},) with values in [0, k_max={k_max}], got shape "
                         f"{tuple(k.shape)} and range [{int(k.min())}, {int(k.max())}]")
    return k


def _localise(es: Tensor, k: Tensor, system: System, scene: SceneConfig, cfg: MusicConfig,
              grid: tuple[Tensor, Tensor, Tensor], t: dict[str, float]) -> tuple[Tensor, ...]:
    """Grid spectrum -> 2k grid candidates -> refinement -> re-rank by refined q -> NMS -> top k.

    Refining more candidates than sources matters in the near field: a narrow peak close to the
    array can fall between grid planes and look shallower on the grid than a broad far-field one,
    but after refinement its q is as deep as the others.
    """
    slots = 2 * scene.k_max
    t0 = time.perf_counter()
    q = null_spectrum(es, system, *_grid_points(grid))
    t1 = time.perf_counter()
    cand = find_peaks(q, grid, 2 * k, slots, cfg)
    del q
    t2 = time.perf_counter()
    phi, theta, r, f = refine(*cand, es, system, scene, cfg)
    order = f.argsort(-1)  # unfilled slots carry q = inf, so they sort last
    phi, theta, r, mask = (v.gather(-1, order) for v in (phi, theta, r, cand[3]))
    keep = _nms(phi, theta, r, mask, cfg)
    (phi, theta, r), mask = _first_kept([phi, theta, r], keep, k, scene.k_max)
    r[~mask] = 1.0
    t["spectrum"] += t1 - t0
    t["peaks"] += t2 - t1
    t["refine"] += time.perf_counter() - t2
    return phi, theta, r, mask


def music(R: Tensor, k: Tensor | None, system: System, scene: SceneConfig, cfg: MusicConfig,
          timings: dict[str, float] | None = None) -> Estimates:
    """2.5-D MUSIC on covariances R (B, N, N) with k (B,) sources (None: ``estimate_k``).

    Returns at most k[b] sources per scene, ordered by refined spectrum depth. Sources closer than
    cfg.nms_deg in direction and cfg.nms_range_frac in ln r are not resolved (one estimate).
    ``timings``, when given, accumulates seconds per stage ('eigh', 'spectrum', 'peaks', 'refine')
    and receives the grid size ('grid_points').
    MUSIC is an estimator, not a loss: R is detached and the work runs on the CPU (like ``System``);
    the Estimates are CPU tensors whatever the device of R.
    """
    k_max, b = scene.k_max, R.shape[0]
    t = {"eigh": 0.0, "spectrum": 0.0, "peaks": 0.0, "refine": 0.0}
    t0 = time.perf_counter()
    R = R.detach().cpu()
    k = None if k is None else torch.as_tensor(k).detach().cpu()
    evals, es = signal_subspace(R, k_max)
    if k is None:
        k = estimate_k(evals, k_max, rel_floor=R.shape[-1] * eps_of(R.dtype))
    k = _check_k(k, b, k_max)
    es = es * (torch.arange(k_max)[None, :] < k[:, None]).to(es.dtype)[:, None, :]
    grid = search_grid(scene, cfg, dtype=torch.float32)
    t["eigh"] += time.perf_counter() - t0
    parts = [_localise(es[s:s + GROUP], k[s:s + GROUP], system, scene, cfg, grid, t) for s in range(0, b, GROUP)]
    phi, theta, r, mask = (torch.cat(x) for x in zip(*parts))
    if timings is not None:
        for key, v in t.items():
            timings[key] = timings.get(key, 0.0) + v
        timings["grid_points"] = float(math.prod(ax.shape[0] for ax in grid))
    logger.debug("music: B=%d timings %s", b, t)
    return Estimates(phi=phi, theta=theta, r=r, mask=mask, k=mask.sum(-1))


__all__ = ["Estimates", "MusicError", "single_threaded", "estimate_k", "signal_subspace", "null_spectrum",
           "music_spectrum", "find_peaks", "refine", "music"]
