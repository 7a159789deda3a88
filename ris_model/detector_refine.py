"""Fast Levenberg-Marquardt on the concentrated ML cost for the learned pipeline (``detector_infer``).

The same iteration as ``ml_estimator.levenberg_marquardt`` (same cost, exact variable-projection Jacobian of
Golub-Pereyra, same damping and acceptance rule, float64), computed with less work:
  - the steering vector's derivatives in closed form instead of forward-mode autograd. With
    rho_n = ||p - p_n|| (p = r u, u = (sin phi cos theta, sin theta, cos phi cos theta)) and d_n = rho_n - r:
        dd_n/dphi   = -r (p_n . u_phi) / rho_n          (u . u_phi = 0)
        dd_n/dtheta = -r (p_n . u_theta) / rho_n
        dd_n/dln r  = r (r - u.p_n - rho_n) / rho_n = r ((u.p_n)^2 - ||p_n||^2) / (rho_n (r - u.p_n + rho_n))
    (no cancellation), and da_n = -j k0 dd_n a_n; the Fresnel model of ``geometry.path_difference`` likewise;
  - the columns and their derivatives of a trial point by ONE GEMM with the stacked operators [Phi_1; ..; Phi_L],
    kept when the trial is accepted, so an accepted step costs one GEMM and one projection (the generic code
    computes the columns twice and the Jacobian through a second projection of 3k vectors);
  - the normal matrix as Re(J^H J) and the gradient as Re(J^H r) (complex GEMMs over the L M rows), and the
    Gram matrices by a Cholesky solve.
Every scene of a call holds the same number k of sources (the caller groups scenes by k).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ris_model.ml_estimator import LM_TOL
from ris_model.simulate import System


class FastRefiner:
    """LM of the concentrated ML cost for ONE system (channel + codes): ``refine(x, y, iters)``."""

    def __init__(self, system: System, phis: Tensor, lo: Tensor, hi: Tensor):
        """phis (1, L, M, N) complex128: the operators Phi_l = H diag(c_l); lo / hi (3,): the parameter box."""
        _, self.L, self.m, self.n = phis.shape
        self.f = phis[0].reshape(self.L * self.m, self.n).to(torch.complex128).contiguous()  # (L M, N)
        self.pos = system.positions.to(torch.float64)  # (N, 3)
        self.pn2 = (self.pos ** 2).sum(-1)  # (N,)
        self.k0 = 2 * math.pi / system.wavelength
        self.fresnel = system.fresnel
        self.system = system
        self.lo, self.hi = lo, hi
        self._mjk = torch.complex(torch.zeros((), dtype=torch.float64), torch.tensor(-self.k0, dtype=torch.float64))

    def steering_and_derivatives(self, x: Tensor, derivatives_only: bool = False) -> Tensor:
        """a and d a / d(phi, theta, ln r) of every source of x (B, k, 3): (B, k, 4, N) complex128 (without a:
        (B, k, 3, N)); a as in ``geometry.steering`` (unit norm, a_n = exp(-j k0 (||p - p_n|| - r)) / sqrt(N))."""
        phi, theta, r = x[..., 0:1], x[..., 1:2], x[..., 2:3].exp()  # (B, k, 1)
        sp, cp, st, ct = phi.sin(), phi.cos(), theta.sin(), theta.cos()
        px, py, pz = self.pos[:, 0], self.pos[:, 1], self.pos[:, 2]
        up = sp * ct * px + st * py + cp * ct * pz  # (B, k, N): u . p_n
        u_phi = cp * ct * px - sp * ct * pz  # p_n . du/dphi
        u_theta = -sp * st * px + ct * py - cp * st * pz  # p_n . du/dtheta
        if self.fresnel:
            d = -up + (self.pn2 - up * up) / (2 * r)
            g = -(1 + up / r)
            dd = (g * u_phi, g * u_theta, -(self.pn2 - up * up) / (2 * r))
        else:
            num = self.pn2 - 2 * r * up
            rho = torch.sqrt(r * r + num)
            d = num / (rho + r)
            q = r / rho
            dd = (-q * u_phi, -q * u_theta, q * (up * up - self.pn2) / (r - up + rho))
        a = torch.polar(torch.full_like(d, 1.0 / math.sqrt(self.n)), -self.k0 * d)  # (B, k, N)
        ja = a * self._mjk  # -j k0 a
        return torch.stack(([] if derivatives_only else [a]) + [ja * v for v in dd], 2)

    def columns(self, x: Tensor) -> Tensor:
        """Phi_l a and Phi_l da/d eta of every source: (B, L, M, k, 4) complex128 (one GEMM)."""
        return self._apply(self.steering_and_derivatives(x))

    def _apply(self, vec: Tensor) -> Tensor:
        """Phi_l v for vectors (B, k, J, N): (B, L, M, k, J) (one GEMM)."""
        bsz, k, j, _ = vec.shape
        out = self.f @ vec.reshape(bsz * k * j, self.n).T  # (L M, B k J)
        return out.reshape(self.L, self.m, bsz, k, j).permute(2, 0, 1, 3, 4)

    @staticmethod
    def project(b: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(r = P_perp y, s = B^+ y, W = B (B^H B)^-1) per snapshot: b (B, L, M, k), y (B, L, M). The Gram
        matrix carries the ridge 1e-12 tr / k of ``ml_estimator._projection`` (two coinciding sources)."""
        bh = b.mH
        gram = bh @ b
        k = gram.shape[-1]
        ridge = 1e-12 * torch.diagonal(gram, dim1=-2, dim2=-1).real.mean(-1)
        gram = gram + ridge[..., None, None] * torch.eye(k, dtype=gram.dtype)
        chol = torch.linalg.cholesky(gram)  # raises on a Gram the ridge does not make definite
        s = torch.cholesky_solve(bh @ y[..., None], chol)[..., 0]  # (B, L, k)
        w = torch.cholesky_solve(bh, chol).mH  # (B, L, M, k): B G^-1 (G Hermitian)
        return y - (b @ s[..., None])[..., 0], s, w

    def plain_columns(self, x: Tensor) -> Tensor:
        """B_l = Phi_l A of the sources of x (B, k, 3): (B, L, M, k) complex128 (no derivatives)."""
        bsz, k, _ = x.shape
        a = self.system.steer(x[..., 0], x[..., 1], x[..., 2].exp()).reshape(bsz * k, self.n)
        return (self.f @ a.T).reshape(self.L, self.m, bsz, k).permute(2, 0, 1, 3)

    def energy(self, x: Tensor, y: Tensor) -> Tensor:
        """Residual energies (B,) of x (B, k, 3) (the cost of ``ml_estimator.energy``); k = 0: ||y||^2."""
        if x.shape[1] == 0:
            return y.real.square().sum((-2, -1)) + y.imag.square().sum((-2, -1))
        r = self.project(self.plain_columns(x), y)[0]
        return r.real.square().sum((-2, -1)) + r.imag.square().sum((-2, -1))

    def removal_rise(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Residual energy e (B,) of the k sources of x (B, k, 3) and its rise (B, k) when source j alone is
        removed, from ONE fit: per snapshot the least-squares residual grows by |s_lj|^2 / [(B_l^H B_l)^-1]_jj
        when column j is dropped (the partial-regression identity), summed over the snapshots."""
        b = self.plain_columns(x)
        bh = b.mH
        gram = bh @ b
        k = gram.shape[-1]
        ridge = 1e-12 * torch.diagonal(gram, dim1=-2, dim2=-1).real.mean(-1)
        chol = torch.linalg.cholesky(gram + ridge[..., None, None] * torch.eye(k, dtype=gram.dtype))
        s = torch.cholesky_solve(bh @ y[..., None], chol)[..., 0]  # (B, L, k)
        ginv_diag = torch.diagonal(torch.cholesky_inverse(chol), dim1=-2, dim2=-1).real  # (B, L, k)
        r = y - (b @ s[..., None])[..., 0]
        e = r.real.square().sum((-2, -1)) + r.imag.square().sum((-2, -1))
        rise = ((s.real.square() + s.imag.square()) / ginv_diag).sum(1)
        return e, rise

    def _state(self, cols: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b = cols[..., 0]
        r, s, w = self.project(b, y)
        return r.real.square().sum((-2, -1)) + r.imag.square().sum((-2, -1)), r, s, w

    def normal_equations(self, cols: Tensor, r: Tensor, s: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """J^T J (B, 3k, 3k) and J^T r (B, 3k) of the real residual [Re r; Im r] (Golub-Pereyra Jacobian
        dr/d eta_ic = -s_i P_perp d_ic - W_i d_ic^H r, with d_ic = Phi_l da_i / d eta_c)."""
        bsz, L, m, k, _ = cols.shape
        b, d = cols[..., 0], cols[..., 1:].reshape(bsz, L, m, 3 * k)  # d columns ordered (source, coordinate)
        pd = d - w @ (b.mH @ d)  # P_perp d: W B^H = B G^-1 B^H, the projector onto span(B)
        s3 = s.repeat_interleave(3, -1)[:, :, None, :]  # (B, L, 1, 3k)
        c = (d.conj() * r[..., None]).sum(-2)  # (B, L, 3k): d_ic^H r
        jac = -(pd * s3) - w.repeat_interleave(3, -1) * c[:, :, None, :]  # (B, L, M, 3k)
        jac = jac.reshape(bsz, L * m, 3 * k)
        jtj = (jac.mH @ jac).real
        g = (jac.mH @ r.reshape(bsz, L * m, 1))[..., 0].real
        return jtj, g

    def refine(self, x: Tensor, y: Tensor, iters: int) -> Tensor:
        """``iters`` LM iterations from x (B, k, 3) on y (B, L, M) complex128 (the rule of
        ``ml_estimator.levenberg_marquardt``). A trial point's cost needs its columns only; their derivatives
        are computed once it is accepted and another iteration follows."""
        bsz, k, _ = x.shape
        if iters <= 0 or bsz == 0:
            return x
        y = y.to(torch.complex128)
        mu = torch.full((bsz,), 1e-3, dtype=torch.float64)
        eye = torch.eye(3 * k, dtype=torch.float64)
        cols = self.columns(x)
        cost, r, s, w = self._state(cols, y)
        done = torch.zeros(bsz, dtype=torch.bool)
        for it in range(iters):
            jtj, g = self.normal_equations(cols, r, s, w)
            damp = mu[:, None, None] * (torch.diagonal(jtj, dim1=-2, dim2=-1)[:, None, :] * eye + 1e-12 * eye)
            step = torch.linalg.solve(jtj + damp, -g[..., None])[..., 0].reshape(bsz, k, 3)
            cand = torch.maximum(torch.minimum(x + step, self.hi), self.lo)
            b_new = self.plain_columns(cand)
            r_new, s_new, w_new = self.project(b_new, y)
            cost_new = r_new.real.square().sum((-2, -1)) + r_new.imag.square().sum((-2, -1))
            ok = cost_new < cost
            mu = torch.where(ok, mu / 3, mu * 4).clamp(1e-9, 1e9)
            done = done | (ok & (step.abs().amax((-2, -1)) < LM_TOL)) | (mu >= 1e9)
            last = it == iters - 1 or bool(done.all())
            if bool(ok.all()):
                x, cost, r, s, w = cand, cost_new, r_new, s_new, w_new
                if not last:
                    cols = torch.cat([b_new[..., None], self._apply(self.steering_and_derivatives(cand, True))], -1)
            elif bool(ok.any()):
                x = torch.where(ok[:, None, None], cand, x)
                cost = torch.where(ok, cost_new, cost)
                o = ok[:, None, None]
                r, s, w = torch.where(o, r_new, r), torch.where(o, s_new, s), torch.where(o[..., None], w_new, w)
                if not last:
                    cols = self.columns(x)
            if last:
                break
        return x


__all__ = ["FastRefiner"]
