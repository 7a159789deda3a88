"""Fast Levenberg-Marquardt on the concentrated ML cost for the learned pipeline (``detector_infer``).

The same iteration as ``ml_estimator.levenberg_marquardt`` (same cost, exact variable-projection Jacobian of
Golub-Pereyra, same damping and acceptance rule, float64), computed with less work:
  - the steering vector's derivatives in closed form instead of forward-mode autograd. With
    rho_n = ||p - p_n|| (p = r u, u = (sin phi cos theta, sin theta, cos phi cos theta)) and d_n = rho_n - r:
        dd_n/dphi   = -r (p_n . u_phi) / rho_n          (u . u_phi = 0)
        dd_n/dtheta = -r (p_n . u_theta) / rho_n
        dd_n/dln r  = r (r - u.p_n - rho_n) / rho_n = r ((u.p_n)^2 - ||p_n||^2) / (rho_n (r - u.p_n + rho_n))
    (no cancellation), and da_n = -j k0 dd_n a_n; the Fresnel model of ``geometry.path_difference`` likewise;
  - the columns of a trial point and their derivatives by ONE complex64 GEMM with the stacked operators
    [Phi_1; ..; Phi_L] (the phases before it and the projections after it are float64), the derivatives only
    when another iteration follows;
  - the normal matrix Re(J^H J) and the gradient Re(J^H r) from small per-snapshot matrices (D^H D, D^H B,
    D^H r and the Gram matrix's Cholesky factor, ``normal_equations``), never the (L M, 3k) Jacobian itself.
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
        self.f32 = self.f.to(torch.complex64)  # the column GEMMs (``_apply``)
        self.pos = system.positions.to(torch.float64)  # (N, 3)
        self.pn2 = (self.pos ** 2).sum(-1)  # (N,)
        self.k0 = 2 * math.pi / system.wavelength
        self.fresnel = system.fresnel
        self.system = system
        self.lo, self.hi = lo, hi
        self._mjk = torch.complex(torch.zeros((), dtype=torch.float64), torch.tensor(-self.k0, dtype=torch.float64))

    def steering_and_derivatives(self, x: Tensor) -> Tensor:
        """a and d a / d(phi, theta, ln r) of every source of x (B, k, 3): (B, k, 4, N) complex128; a as in ``geometry.steering`` (unit norm, a_n = exp(-j k0 (||p - p_n|| - r)) / sqrt(N))."""
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
        return torch.stack([a] + [ja * v for v in dd], 2)

    def columns(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """B_l = Phi_l A (B, L, M, k) and its derivatives d_l = Phi_l da/d eta (B, L, M, 3k), ordered (source,
        coordinate), complex128, from ONE GEMM (``_apply``)."""
        return self._split(self._apply(self.steering_and_derivatives(x).flatten(1, 2)), x.shape[1])

    @staticmethod
    def _split(cols: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(B, L, M, 4k) columns ordered (source, [a, d/dphi, d/dtheta, d/dln r]) -> (B, k columns, 3k derivatives)."""
        c = cols.unflatten(-1, (k, 4))
        return c[..., 0].contiguous(), c[..., 1:].flatten(-2).contiguous()

    def _apply(self, vec: Tensor) -> Tensor:
        """Phi_l v for vectors (B, J, N) complex128: (B, L, M, J) complex128, by ONE complex64 GEMM with the stacked
        operators (2x faster than complex128 here; the steering phases before it and the projections after it
        are float64, and a column's relative rounding of ~1e-7 moves a residual energy by < 1e-5 of itself)."""
        bsz, j, _ = vec.shape
        out = self.f32 @ vec.reshape(bsz * j, self.n).T.to(torch.complex64)  # (L M, B J)
        return out.reshape(self.L, self.m, bsz, j).permute(2, 0, 1, 3).to(torch.complex128,
                                                                          memory_format=torch.contiguous_format)

    @staticmethod
    def project(b: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(r = P_perp y, s = B^+ y, the Cholesky factor of the Gram matrix B^H B) per snapshot: b (B, L, M, k),
        y (B, L, M). The Gram matrix carries the ridge 1e-12 tr / k of ``ml_estimator._projection`` (two
        coinciding sources)."""
        bh = b.mH.resolve_conj()  # materialised once (a conjugate view is copied by every product)
        gram = bh @ b
        k = gram.shape[-1]
        ridge = 1e-12 * torch.diagonal(gram, dim1=-2, dim2=-1).real.mean(-1)
        gram = gram + ridge[..., None, None] * torch.eye(k, dtype=gram.dtype)
        chol = torch.linalg.cholesky(gram)  # raises on a Gram the ridge does not make definite
        s = torch.cholesky_solve(bh @ y[..., None], chol)[..., 0]  # (B, L, k)
        return y - (b @ s[..., None])[..., 0], s, chol

    def plain_columns(self, x: Tensor) -> Tensor:
        """B_l = Phi_l A of the sources of x (B, k, 3): (B, L, M, k) complex128 (no derivatives)."""
        return self._apply(self.steering(x))

    def steering(self, x: Tensor) -> Tensor:
        """a of every source of x (B, k, 3): (B, k, N) complex128 (``geometry.steering``, same formula)."""
        phi, theta, r = x[..., 0:1], x[..., 1:2], x[..., 2:3].exp()
        ct = theta.cos()
        up = (phi.sin() * ct) * self.pos[:, 0] + theta.sin() * self.pos[:, 1] + (phi.cos() * ct) * self.pos[:, 2]
        if self.fresnel:
            d = -up + (self.pn2 - up * up) / (2 * r)
        else:
            num = self.pn2 - 2 * r * up
            d = num / (torch.sqrt(r * r + num) + r)
        return torch.polar(torch.full_like(d, 1.0 / math.sqrt(self.n)), -self.k0 * d)

    def energy(self, x: Tensor, y: Tensor) -> Tensor:
        """Residual energies (B,) of x (B, k, 3) (the cost of ``ml_estimator.energy``); k = 0: ||y||^2."""
        if x.shape[1] == 0:
            return _sq(y)
        return _sq(self.project(self.plain_columns(x), y)[0])

    def removal_rise(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Residual energy e (B,) of the k sources of x (B, k, 3) and its rise (B, k) when source j alone is
        removed, from ONE fit: per snapshot the least-squares residual grows by |s_lj|^2 / [(B_l^H B_l)^-1]_jj
        when column j is dropped (the partial-regression identity), summed over the snapshots."""
        r, s, chol = self.project(self.plain_columns(x), y)
        ginv_diag = torch.diagonal(torch.cholesky_inverse(chol), dim1=-2, dim2=-1).real  # (B, L, k)
        rise = ((s.real.square() + s.imag.square()) / ginv_diag).sum(1)
        return _sq(r), rise

    @staticmethod
    def normal_equations(b: Tensor, d: Tensor, r: Tensor, s: Tensor, chol: Tensor) -> tuple[Tensor, Tensor]:
        """J^T J (B, 3k, 3k) and J^T r (B, 3k) of the real residual [Re r; Im r], with the Golub-Pereyra Jacobian
        dr/d eta_ic = -s_i P_perp d_ic - w_i d_ic^H r (d_ic = Phi_l da_i / d eta_c, W = B G^-1, G = B^H B)
        reduced to small matrices: P_perp W = 0 and W^H W = G^-1, so per snapshot
            J^H J = diag(s3)^* (D^H D - D^H B G^-1 B^H D) diag(s3) + (c^* c^T) o (G^-1 (x) 1_33),
            J^H r = -s3^* o c,    with c = D^H r and s3 = s repeated per coordinate (B^H r = 0),
        and J^T J = Re sum_l J^H J, J^T r = Re sum_l J^H r. No (L M, 3k) Jacobian is formed."""
        dh = d.mH.resolve_conj()  # (B, L, 3k, M), materialised once
        dhb = dh @ b  # (B, L, 3k, k)
        p = dh @ d - dhb @ torch.cholesky_solve(dhb.mH, chol)  # D^H P_perp D (B, L, 3k, 3k)
        c = (dh @ r[..., None])[..., 0]  # (B, L, 3k)
        s3 = s.repeat_interleave(3, -1)  # (B, L, 3k)
        ginv = torch.cholesky_inverse(chol).repeat_interleave(3, -1).repeat_interleave(3, -2)
        jhj = s3.conj()[..., :, None] * p * s3[..., None, :] + c.conj()[..., :, None] * c[..., None, :] * ginv
        return jhj.sum(1).real, -(s3.conj() * c).sum(1).real

    def refine(self, x: Tensor, y: Tensor, iters: int) -> Tensor:
        """``iters`` LM iterations from x (B, k, 3) on y (B, L, M) complex128 (the rule of
        ``ml_estimator.levenberg_marquardt``). A trial point's columns and derivatives come from one GEMM (the
        columns alone on the last iteration)."""
        bsz, k, _ = x.shape
        if iters <= 0 or bsz == 0:
            return x
        y = y.to(torch.complex128)
        mu = torch.full((bsz,), 1e-3, dtype=torch.float64)
        eye = torch.eye(3 * k, dtype=torch.float64)
        b, d = self.columns(x)
        r, s, chol = self.project(b, y)
        cost = _sq(r)
        done = torch.zeros(bsz, dtype=torch.bool)
        for it in range(iters):
            jtj, g = self.normal_equations(b, d, r, s, chol)
            damp = mu[:, None, None] * (torch.diagonal(jtj, dim1=-2, dim2=-1)[:, None, :] * eye + 1e-12 * eye)
            step = torch.linalg.solve(jtj + damp, -g[..., None])[..., 0].reshape(bsz, k, 3)
            cand = torch.maximum(torch.minimum(x + step, self.hi), self.lo)
            last = it == iters - 1  # the trial's derivatives are needed only when another iteration follows
            if last:
                b_new = self.plain_columns(cand)
            else:
                b_new, d_new = self._split(self._apply(self.steering_and_derivatives(cand).flatten(1, 2)), k)
            r_new, s_new, chol_new = self.project(b_new, y)
            cost_new = _sq(r_new)
            ok = cost_new < cost
            mu = torch.where(ok, mu / 3, mu * 4).clamp(1e-9, 1e9)
            done = done | (ok & (step.abs().amax((-2, -1)) < LM_TOL)) | (mu >= 1e9)
            if last or bool(done.all()):
                return torch.where(ok[:, None, None], cand, x)
            if bool(ok.any()):
                o = ok[:, None, None]
                x, cost = torch.where(o, cand, x), torch.where(ok, cost_new, cost)
                d = torch.where(o[..., None], d_new, d)
                b, r, s = torch.where(o[..., None], b_new, b), torch.where(o, r_new, r), torch.where(o, s_new, s)
                chol = torch.where(o[..., None], chol_new, chol)
        return x


def _sq(r: Tensor) -> Tensor:
    """sum over the last two dimensions of |r|^2 (residual energies)."""
    return r.real.square().sum((-2, -1)) + r.imag.square().sum((-2, -1))


__all__ = ["FastRefiner"]
