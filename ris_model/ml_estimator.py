"""Classical measurement-domain maximum-likelihood localisation: greedy grid selection, alternating
projection and Levenberg-Marquardt on the concentrated (deterministic-signal) likelihood.

Model (docs/physics.md section 2): snapshot l is y_l = B_l(eta) s_l + n_l with B_l = Phi_l A(eta),
Phi_l = H diag(c_l) (M x N), A = [a_1 .. a_K] (THE steering vector), unknown symbols s_l and white noise
n_l ~ CN(0, sigma^2 I_M). Maximising the likelihood over s_l and sigma^2 leaves the concentrated cost

    e_K(eta) = sum_l || P_perp(B_l(eta)) y_l ||^2      (residual energy after a per-snapshot projection)

minimised over eta = (phi_k, theta_k, ln r_k)_k. ``ml_path`` builds the nested fits k = 1..k_max:
  1. greedy: the grid cell whose unit columns b_l / ||b_l|| capture most residual energy is added;
  2. Levenberg-Marquardt on all k sources jointly (Jacobian by forward-mode autograd, float64);
  3. ``ap_sweeps`` alternating-projection sweeps: each source in turn is re-selected on the grid with the
     others projected out, the k sources are refined again, and the new fit is kept where e_k dropped.
The residual energies e_0 >= e_1 >= ... >= e_kmax are the model-order evidence (``model_order``):
e_k ~ L (M - k) sigma^2 once k >= K, a genuine noise plateau.
Everything is batched over scenes (at step k every scene holds exactly k sources).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ris_model.config import SceneConfig
from ris_model.music import Estimates
from ris_model.simulate import System

logger = logging.getLogger(__name__)


GRID_FLOOR = 1e-3  # a grid column inside the span of the fitted sources (kept energy < 0.1 %) is not a candidate
LM_TOL = 1e-9  # radians / ln metres: refinement stops once every accepted step is below this


class MLError(ValueError):
    """Bad input to the ML estimator (shapes, channel layout)."""


@dataclass(frozen=True)
class MLConfig:
    """Grid of the greedy / alternating-projection search and the refinement budget."""

    grid_step_deg: float = 2.0  # phi and theta step of the search grid (refinement is continuous)
    n_range: int = 20  # range planes of the search grid, uniform in 1/r
    lm_iters: int = 20  # Levenberg-Marquardt iterations per refinement
    ap_sweeps: int = 0  # alternating-projection sweeps after each greedy step
    exact_step: bool = False  # greedy score normalised by the column energy left after the fitted sources
    whiten_delta: float = 0.01  # loading of the search whitener (``whitener``), relative to its mean eigenvalue
    chunk_cells: int = 4096  # grid cells scored per GEMM (memory: B L chunk complex128)


@dataclass(frozen=True)
class MLPath:
    """Nested fits: params[k-1] (B, k, 3) = (phi, theta, ln r) of the k-source fit; energy (B, k_max + 1)
    residual energies e_0..e_kmax; seconds: wall time of the whole call."""

    params: list[Tensor]
    energy: Tensor
    seconds: float

    def estimates(self, k: Tensor, k_max: int) -> Estimates:
        """The fit with k[b] sources of every scene, padded to k_max slots."""
        b = k.shape[0]
        phi, theta, r = (torch.zeros(b, k_max, dtype=torch.float64) for _ in range(3))
        r.fill_(1.0)
        mask = torch.arange(k_max)[None, :] < k[:, None]
        for kk in range(1, len(self.params) + 1):
            sel = k == kk
            p = self.params[kk - 1][sel]
            phi[sel, :kk], theta[sel, :kk], r[sel, :kk] = p[..., 0], p[..., 1], p[..., 2].exp()
        return Estimates(phi=phi, theta=theta, r=r, mask=mask, k=mask.sum(-1))


def operators(channel: Tensor, codes: Tensor) -> Tensor:
    """Phi_l = H diag(c_l): (B, L, M, N) complex128 from channel (B, M, N) and codes (B, L, N)."""
    return channel.to(torch.complex128)[:, None] * codes.to(torch.complex128)[:, :, None, :]


def _box(scene: SceneConfig) -> tuple[Tensor, Tensor]:
    lo = torch.tensor([math.radians(scene.phi_deg[0]), math.radians(scene.theta_deg[0]), math.log(scene.range_m[0])],
                      dtype=torch.float64)
    hi = torch.tensor([math.radians(scene.phi_deg[1]), math.radians(scene.theta_deg[1]), math.log(scene.range_m[1])],
                      dtype=torch.float64)
    return lo, hi


class GridDictionary:
    """Unit measurement columns of a (phi, theta, r) grid for ONE channel and code set (conjugated: (L, M, G))."""

    def __init__(self, system: System, phis: Tensor, scene: SceneConfig, cfg: MLConfig):
        def axis(lo: float, hi: float) -> Tensor:
            n = int(math.floor((hi - lo) / cfg.grid_step_deg + 1e-9)) + 1
            return torch.deg2rad(lo + cfg.grid_step_deg * torch.arange(n, dtype=torch.float64))
        lo, hi = scene.range_m
        # planes uniform in 1/r: the near-field phase curvature (||p_n||^2 - (u.p_n)^2) / (2 r) is linear in
        # 1/r, so equal steps in 1/r are equal phase steps (log spacing leaves the 0.5-1 m planes too sparse)
        inv_r = torch.linspace(1 / hi, 1 / lo, cfg.n_range, dtype=torch.float64)
        grid = torch.meshgrid(axis(*scene.phi_deg), axis(*scene.theta_deg), 1 / inv_r, indexing="ij")
        self.points = torch.stack([grid[0].reshape(-1), grid[1].reshape(-1), grid[2].reshape(-1).log()], -1)
        a = system.steer(grid[0].reshape(-1), grid[1].reshape(-1), grid[2].reshape(-1))  # (G, N)
        cols = torch.einsum("lmn,gn->lgm", phis, a)
        # complex64 is enough to pick the best cell (the refinement is float64)
        self.cols_h = (cols / cols.norm(dim=-1, keepdim=True)).conj().transpose(-1, -2).to(torch.complex64).contiguous()
        self.chunk, self.exact = cfg.chunk_cells, cfg.exact_step

    def best(self, res: Tensor, basis: Tensor | None) -> Tensor:
        """The grid point (B, 3) that, added to the sources already fitted, lowers the residual most:
        argmax_g sum_l |u_lg^H r_l|^2 / (1 - ||Q_l^H u_lg||^2), the exact one-source ML step (the
        numerator alone is the Bartlett score, which favours the sidelobes of the fitted sources).
        res (B, L, M) residuals P_perp y; basis (B, L, M, k) orthonormal columns of the fitted sources."""
        rt = res.transpose(0, 1).to(torch.complex64)  # (L, B, M)
        qt = None if basis is None else basis.mH.transpose(0, 1).to(torch.complex64)  # (L, B, k, M)
        best_val = torch.full((res.shape[0],), -1.0, dtype=torch.float64)
        best_idx = torch.zeros(res.shape[0], dtype=torch.int64)
        for start in range(0, self.cols_h.shape[-1], self.chunk):
            cols = self.cols_h[..., start:start + self.chunk]
            proj = rt @ cols  # (L, B, chunk)
            num = proj.real.square() + proj.imag.square()  # (L, B, chunk): |u_lg^H r_l|^2
            if qt is not None and self.exact:
                pq = qt @ cols[:, None]  # (L, B, k, chunk)
                kept = 1 - (pq.real.square() + pq.imag.square()).sum(-2)
                num = num / kept.clamp_min(GRID_FLOOR)
            val, idx = num.sum(0).double().max(-1)
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + start, best_idx)
        return self.points[best_idx]


def _columns(x: Tensor, phis: Tensor, system: System) -> Tensor:
    """B_l = Phi_l A for one scene: x (k, 3), phis (L, M, N) -> (L, M, k)."""
    a = system.steer(x[:, 0], x[:, 1], x[:, 2].exp())  # (k, N)
    return phis @ a.T


def _columns_and_derivatives(x: Tensor, phis: Tensor, system: System) -> tuple[Tensor, Tensor]:
    """B (B, L, M, k) and dB/d(phi, theta, ln r) of each column (B, L, M, k, 3) for x (B, k, 3).

    Sources are independent, so ONE forward-mode pass over three stacked copies of x (copy j with a
    tangent of ones in coordinate j) gives every steering derivative (dual numbers; torch.func.jvp per
    coordinate was 3-7x slower here)."""
    bsz, k, _ = x.shape
    x3 = x.unsqueeze(0).expand(3, -1, -1, -1).contiguous()
    tangent = torch.eye(3, dtype=x.dtype)[:, None, None, :].expand(3, bsz, k, 3).contiguous()
    with fwAD.dual_level():
        xd = fwAD.make_dual(x3, tangent)
        a, da = fwAD.unpack_dual(system.steer(xd[..., 0], xd[..., 1], xd[..., 2].exp()))  # (3, B, k, N)
    stack = torch.cat([a[:1], da], 0).permute(1, 2, 0, 3).reshape(bsz, k * 4, -1)  # a, d/dphi, d/dtheta, d/dlnr
    cols = _apply(phis, stack).reshape(bsz, phis.shape[1], phis.shape[2], k, 4)
    return cols[..., 0], cols[..., 1:]


def _apply(phis: Tensor, vecs: Tensor) -> Tensor:
    """Phi_l v for every snapshot: phis (1|B, L, M, N), vecs (B, J, N) -> (B, L, M, J).
    One channel: a single (L M, N) x (N, B J) GEMM instead of B L small ones."""
    bsz, j, n = vecs.shape
    if phis.shape[0] == 1:
        _, L, m, _ = phis.shape
        out = phis.reshape(L * m, n) @ vecs.reshape(bsz * j, n).T  # (L M, B J)
        return out.reshape(L, m, bsz, j).permute(2, 0, 1, 3)
    return phis @ vecs.transpose(-1, -2)[:, None]


def _project_out(b: Tensor, y: Tensor) -> Tensor:
    """P_perp(B_l) y_l per snapshot: b (..., L, M, k), y (..., L, M) -> (..., L, M)."""
    return _projection(b, y)[0]


def _projection(b: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(P_perp y, s = B^+ y, (B^H B)^-1) per snapshot for b (..., L, M, k), y (..., L, M).

    The normal equations carry a ridge of 1e-12 tr(B^H B) / k: it only matters when two columns coincide
    (two sources on one point), where it picks the minimum-norm symbols instead of dividing by zero."""
    bh = b.mH
    gram = bh @ b
    k = gram.shape[-1]
    ridge = 1e-12 * torch.diagonal(gram, dim1=-2, dim2=-1).real.mean(-1)
    ginv = torch.linalg.inv(gram + ridge[..., None, None] * torch.eye(k, dtype=gram.dtype))
    s = (ginv @ (bh @ y[..., None]))[..., 0]
    return y - (b @ s[..., None])[..., 0], s, ginv


def residual_and_jacobian(x: Tensor, phis: Tensor, y: Tensor, system: System) -> tuple[Tensor, Tensor]:
    """Concentrated-ML residual r = P_perp y (B, L, M) and its exact Jacobian (B, L, M, k, 3) over
    (phi, theta, ln r) of every source (variable projection, Golub-Pereyra):
        dr/d eta = -P_perp dB s - B (B^H B)^-1 dB^H r
    where dB, the derivative of one column, is non-zero in that column only."""
    b, db = _columns_and_derivatives(x, phis, system)
    r, s, ginv = _projection(b, y)
    t1 = db * s[..., None, :, None]  # (B, L, M, k, 3): dB_j s = d_j s_k
    bsz, L, m, k, _ = db.shape
    t1 = _project_out(b[:, :, None].expand(-1, -1, 3 * k, -1, -1), t1.movedim(2, -1).reshape(bsz, L, 3 * k, m))
    c = (db.conj() * r[..., None, None]).sum(2)  # (B, L, k, 3): d_j^H r
    w = b @ ginv  # (B, L, M, k): B (B^H B)^-1
    t2 = w[..., :, None] * c[:, :, None]  # (B, L, M, k, 3): column k of w times d_j^H r
    jac = -t1.reshape(bsz, L, k, 3, m).movedim(-1, 2) - t2
    return r, jac


def residual_vector(x: Tensor, phis: Tensor, y: Tensor, system: System) -> Tensor:
    """Real residual vector (2 L M,) of one scene for parameters x (k, 3): the concentrated-ML residual."""
    return torch.view_as_real(_project_out(_columns(x, phis, system), y)).reshape(-1)


def energy(x: Tensor, phis: Tensor, y: Tensor, system: System) -> Tensor:
    """Residual energies (B,) for x (B, k, 3), phis (B|1, L, M, N), y (B, L, M); k = 0 gives ||y||^2."""
    if x.shape[1] == 0:
        return (y.abs() ** 2).sum((-2, -1))
    b = _apply(phis, system.steer(x[..., 0], x[..., 1], x[..., 2].exp()))
    return (_project_out(b, y).abs() ** 2).sum((-2, -1))


def levenberg_marquardt(x: Tensor, phis: Tensor, y: Tensor, system: System, lo: Tensor, hi: Tensor,
                        iters: int) -> Tensor:
    """Minimise the concentrated cost of every scene jointly over its k sources: x (B, k, 3) -> (B, k, 3)."""
    bsz, k, _ = x.shape
    mu = torch.full((bsz,), 1e-3, dtype=torch.float64)
    eye = torch.eye(3 * k, dtype=torch.float64)
    cost = energy(x, phis, y, system)
    done = torch.zeros(bsz, dtype=torch.bool)
    for _ in range(iters):
        r, jac = residual_and_jacobian(x, phis, y, system)
        j = torch.view_as_real(jac.reshape(bsz, -1, 3 * k)).transpose(-1, -2).reshape(bsz, -1, 3 * k)
        rv = torch.view_as_real(r.reshape(bsz, -1)).reshape(bsz, -1)
        jtj = j.transpose(-1, -2) @ j
        g = (j.transpose(-1, -2) @ rv[..., None])[..., 0]
        damp = mu[:, None, None] * (torch.diagonal(jtj, dim1=-2, dim2=-1)[:, None, :] * eye + 1e-12 * eye)
        step = torch.linalg.solve(jtj + damp, -g[..., None])[..., 0].reshape(bsz, k, 3)
        cand = torch.maximum(torch.minimum(x + step, hi), lo)
        cost_new = energy(cand, phis, y, system)
        ok = cost_new < cost
        x = torch.where(ok[:, None, None], cand, x)
        cost = torch.where(ok, cost_new, cost)
        mu = torch.where(ok, mu / 3, mu * 4).clamp(1e-9, 1e9)
        done = done | (ok & (step.abs().amax((-2, -1)) < LM_TOL)) | (mu >= 1e9)
        if bool(done.all()):
            break
    return x


def _residual_without(x: Tensor, skip: int | None, phis: Tensor, y: Tensor, system: System
                      ) -> tuple[Tensor, Tensor | None]:
    """Residual (B, L, M) after projecting out the sources of x (B, k, 3) except source ``skip``, and the
    orthonormal basis (B, L, M, k') of the columns projected out (None when there are none)."""
    keep = [i for i in range(x.shape[1]) if i != skip]
    if not keep:
        return y, None
    xs = x[:, keep]
    b = _apply(phis, system.steer(xs[..., 0], xs[..., 1], xs[..., 2].exp()))
    q = torch.linalg.qr(b).Q
    return y - (q @ (q.mH @ y[..., None]))[..., 0], q


def whitener(phis: Tensor, delta: float) -> Tensor:
    """W_l = (Phi_l Phi_l^H / N + delta mean_eig I)^(-1/2): (1|B, L, M, M).

    Why: the LoS part of H makes Phi_l nearly rank one in energy, so in raw measurements one BS-side
    direction carries most of every snapshot's power and ANY grid cell with a free symbol per snapshot
    explains it; the greedy search then locks on wrong cells (measured: 25 of 48 scenes at 20 dB ended in a
    worse minimum than a start at the truth). W_l equalises the BS-side dimensions for sources spread
    over the field of view; the search runs on W y, the final fits on the unweighted (ML) cost."""
    g = phis @ phis.mH / phis.shape[-1]
    m = g.shape[-1]
    g = g + delta * torch.diagonal(g, dim1=-2, dim2=-1).real.mean(-1)[..., None, None] * torch.eye(m, dtype=g.dtype)
    ev, v = torch.linalg.eigh(g)
    return v @ torch.diag_embed(ev.rsqrt().to(v.dtype)) @ v.mH


class MLEstimator:
    """The ML estimator for ONE channel and code set (the whitener and the grid dictionary are built once)."""

    def __init__(self, system: System, channel: Tensor, codes: Tensor, scene: SceneConfig, cfg: MLConfig = MLConfig()):
        self.system, self.scene, self.cfg = system, scene, cfg
        self.phis = operators(channel[None], codes[None])  # (1, L, M, N)
        self.w = whitener(self.phis, cfg.whiten_delta)
        self.phis_w = self.w @ self.phis
        self.dictionary = GridDictionary(system, self.phis_w[0], scene, cfg)
        self.box = _box(scene)

    def path(self, y: Tensor) -> MLPath:
        """Nested ML fits k = 1..k_max of every scene of y (B, L, M) (see the module docstring)."""
        if y.ndim != 3 or y.shape[-2:] != self.phis.shape[1:3]:
            raise MLError(f"MLEstimator.path: y must be (B, L, M) = (B, {self.phis.shape[1]}, {self.phis.shape[2]}), "
                          f"got {tuple(y.shape)}")
        t0 = time.perf_counter()
        y = y.to(torch.complex128)
        yw = (self.w @ y[..., None])[..., 0]
        lo, hi = self.box
        sys_, iters = self.system, self.cfg.lm_iters
        x = torch.zeros(y.shape[0], 0, 3, dtype=torch.float64)
        energies, params = [energy(x, self.phis, y, sys_)], []
        for _ in range(self.scene.k_max):
            # search on the whitened problem: greedy step, joint refinement, alternating projection
            new = self.dictionary.best(*_residual_without(x, None, self.phis_w, yw, sys_))
            x = levenberg_marquardt(torch.cat([x, new[:, None]], 1), self.phis_w, yw, sys_, lo, hi, iters)
            e = energy(x, self.phis_w, yw, sys_)
            for _ in range(self.cfg.ap_sweeps):
                for i in range(x.shape[1]):
                    alt = x.clone()
                    alt[:, i] = self.dictionary.best(*_residual_without(x, i, self.phis_w, yw, sys_))
                    alt = levenberg_marquardt(alt, self.phis_w, yw, sys_, lo, hi, iters)
                    e_alt = energy(alt, self.phis_w, yw, sys_)
                    x = torch.where((e_alt < e)[:, None, None], alt, x)
                    e = torch.minimum(e_alt, e)
            # the ML fit proper: the unweighted concentrated cost, started at the search's solution
            fit = levenberg_marquardt(x, self.phis, y, sys_, lo, hi, iters)
            energies.append(energy(fit, self.phis, y, sys_))
            params.append(fit)
        seconds = time.perf_counter() - t0
        logger.info("ML path: %d scenes, k <= %d, %.2f s (%.3f s/scene)", y.shape[0], self.scene.k_max, seconds,
                    seconds / max(y.shape[0], 1))
        return MLPath(params=params, energy=torch.stack(energies, -1), seconds=seconds)


__all__ = ["MLError", "MLConfig", "MLPath", "GridDictionary", "MLEstimator", "operators", "whitener",
           "residual_and_jacobian", "residual_vector", "energy", "levenberg_marquardt"]
