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
A call takes scenes with different numbers of sources at once: x (B, K, 3) with k (B,) the number of each
scene's sources (its first k slots; None: all K). A slot past k gets a zero column, a unit diagonal in the Gram
matrix and in the normal matrix, so it leaves the residual, the projection and the other sources' steps exactly
as a call on the first k slots would (one call per batch instead of one per k: the per-call costs dominate).
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
        self.f32 = self.f.to(torch.complex64)  # the column GEMMs (``_gemm``)
        self.pos = system.positions.to(torch.float64)  # (N, 3)
        self.pn2 = (self.pos ** 2).sum(-1)  # (N,)
        self.k0 = 2 * math.pi / system.wavelength
        self.fresnel = system.fresnel
        self.system = system
        self.lo, self.hi = lo, hi

    def steering_and_derivatives(self, x: Tensor) -> Tensor:
        """a and d a / d(phi, theta, ln r) of every source of x (B, k, 3): (B, k, 4, N) complex128; a as in ``geometry.steering`` (unit norm, a_n = exp(-j k0 (||p - p_n|| - r)) / sqrt(N))."""
        bsz, n = x.shape[:2]
        v = self._vectors(x)
        return torch.cat([v[:, :n, None], v[:, n:].reshape(bsz, n, 3, -1)], 2)

    def _vectors(self, x: Tensor) -> Tensor:
        """``steering_and_derivatives`` ordered [a_1..a_K, da_1..da_K] (B, 4K, N) complex128, written in place
        into one tensor: with a = c + j s, -j k0 a = k0 s - j k0 c, so da/d eta = (k0 s) dd/d eta - j (k0 c) dd/d eta
        (the values of the complex products, without a complex copy of each real factor)."""
        bsz, n = x.shape[:2]
        phi, theta, r = x[..., 0], x[..., 1], x[..., 2:3].exp()  # (B, k), (B, k), (B, k, 1)
        sp, cp, st, ct = phi.sin(), phi.cos(), theta.sin(), theta.cos()
        # u, du/dphi and du/dtheta (B, k, 3, 3) against every p_n in one product: u . p_n, p_n . u_phi, p_n . u_theta
        frame = torch.stack([sp * ct, st, cp * ct, cp * ct, torch.zeros_like(st), -sp * ct, -sp * st, ct, -cp * st], -1)
        up, u_phi, u_theta = (frame.reshape(*phi.shape, 3, 3) @ self.pos.T).unbind(-2)  # (B, k, N) each
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
        phase, mag = -self.k0 * d, 1.0 / math.sqrt(self.n)
        c, s = phase.cos() * mag, phase.sin() * mag  # a = c + j s (``_unit_phasor``)
        out = torch.empty(bsz, 4 * n, self.n, 2, dtype=torch.float64)
        out[:, :n, :, 0], out[:, :n, :, 1] = c, s
        der = out[:, n:].view(bsz, n, 3, self.n, 2)
        dd = torch.stack(dd, 2)  # (B, k, 3, N)
        torch.mul((s * self.k0)[:, :, None], dd, out=der[..., 0])
        torch.mul((c * -self.k0)[:, :, None], dd, out=der[..., 1])
        return torch.view_as_complex(out)

    def _unit_phasor(self, d: Tensor) -> Tensor:
        """exp(-j k0 d) / sqrt(N): the values of ``torch.polar`` (|a| cos, |a| sin) from vectorised cos and sin
        (``torch.polar`` is 2-3x slower here)."""
        phase, mag = -self.k0 * d, 1.0 / math.sqrt(self.n)
        return torch.complex(phase.cos() * mag, phase.sin() * mag)

    def columns(self, x: Tensor, k: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """B_l = Phi_l A (B, L, M, K) and its derivatives d_l = Phi_l da/d eta (B, L, M, 3K), ordered (source,
        coordinate), complex128, from ONE GEMM (``_gemm``) on the vectors ordered [a_1..a_K, da_1..da_K]
        (both blocks then slices of one (B, L, M, 4K) tensor); zero columns for the slots past k."""
        n = x.shape[1]
        keep = _slots(k, n)
        if keep is not None:
            keep = torch.cat([keep, keep.repeat_interleave(3, -1)], -1)
        c = self._gemm(self._vectors(x), keep)
        c = _batch_first(c)  # (B, L, M, 4K)
        return c[..., :n], c[..., n:]

    def _gemm(self, vec: Tensor, keep: Tensor | None = None) -> Tensor:
        """Phi_l v for vectors (B, J, N) complex128: (L, M, B, J) complex64, by ONE complex64 GEMM with the stacked
        operators (2x faster than complex128 here; the steering phases before it and the projections after it
        are float64, and a column's relative rounding of ~1e-7 moves a residual energy by < 1e-5 of itself).
        ``keep`` (B, J) bool: only those vectors enter the GEMM, the others give zero columns."""
        bsz, j, _ = vec.shape
        flat = vec.reshape(bsz * j, self.n)
        if keep is None:
            out = self.f32 @ flat.T.to(torch.complex64)  # (L M, B J)
        else:
            keep = keep.reshape(-1)
            out = torch.zeros(self.L * self.m, bsz * j, dtype=torch.complex64)
            out[:, keep] = self.f32 @ flat[keep].T.to(torch.complex64)
        return out.reshape(self.L, self.m, bsz, j)

    @staticmethod
    def project(b: Tensor, y: Tensor, k: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(r = P_perp y, s = B^+ y, the Cholesky factor of the Gram matrix B^H B) per snapshot: b (B, L, M, K),
        y (B, L, M). The Gram matrix carries the ridge 1e-12 tr / k of ``ml_estimator._projection`` (two
        coinciding sources); a slot past k[b] (a zero column) gets a unit diagonal, so s is 0 there."""
        bh = b.mH.resolve_conj()  # materialised once (a conjugate view is copied by every product)
        gram = bh @ b
        keep = _slots(k, gram.shape[-1])
        diag = torch.diagonal(gram, dim1=-2, dim2=-1)  # a view: the ridge is added in place
        if keep is None:
            diag.add_((1e-12 * diag.real.mean(-1))[..., None])
        else:
            ridge = 1e-12 * diag.real.sum(-1) / k[:, None]  # (B, L): the mean over the k real columns
            diag.copy_(torch.where(keep[:, None, :], diag + ridge[..., None], 1.0))
        chol = torch.linalg.cholesky(gram)  # raises on a Gram the ridge does not make definite
        s = torch.cholesky_solve(bh @ y[..., None], chol)[..., 0]  # (B, L, K)
        return y - (b @ s[..., None])[..., 0], s, chol

    def plain_columns(self, x: Tensor, k: Tensor | None = None) -> Tensor:
        """B_l = Phi_l A of the sources of x (B, K, 3): (B, L, M, K) complex128 (no derivatives; zero past k)."""
        return _batch_first(self._gemm(self.steering(x), _slots(k, x.shape[1])))

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
        return self._unit_phasor(d)

    def residual(self, x: Tensor, y: Tensor, k: Tensor | None = None) -> Tensor:
        """P_perp(B_l) y_l (B, L, M) after the first k[b] sources of x (B, K, 3)."""
        return self.project(self.plain_columns(x, k), y, k)[0]

    def energy(self, x: Tensor, y: Tensor, k: Tensor | None = None) -> Tensor:
        """Residual energies (B,) of the first k[b] sources of x (B, K, 3) (the cost of ``ml_estimator.energy``);
        no source: ||y||^2."""
        if x.shape[1] == 0:
            return residual_energy(y)
        return residual_energy(self.residual(x, y, k))

    def removal_rise(self, x: Tensor, y: Tensor, k: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Residual energy e (B,) of the first k[b] sources of x (B, K, 3) and its rise (B, K) when source j alone
        is removed (+inf past k), from ONE fit: per snapshot the least-squares residual grows by
        |s_lj|^2 / [(B_l^H B_l)^-1]_jj when column j is dropped (the partial-regression identity), summed over the
        snapshots."""
        r, rise = self.residual_and_rise(x, y, k)
        return residual_energy(r), rise

    def residual_and_rise(self, x: Tensor, y: Tensor, k: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``removal_rise`` with the residual P_perp(B_l) y_l (B, L, M) itself in place of its energy."""
        r, s, chol = self.project(self.plain_columns(x, k), y, k)
        ginv_diag = torch.diagonal(torch.cholesky_inverse(chol), dim1=-2, dim2=-1).real  # (B, L, K)
        rise = ((s.real.square() + s.imag.square()) / ginv_diag).sum(1)
        keep = _slots(k, x.shape[1])
        return r, rise if keep is None else rise.masked_fill(~keep, float("inf"))

    @staticmethod
    def normal_equations(b: Tensor, d: Tensor, r: Tensor, s: Tensor, chol: Tensor) -> tuple[Tensor, Tensor]:
        """J^T J (B, 3k, 3k) and J^T r (B, 3k) of the real residual [Re r; Im r], with the Golub-Pereyra Jacobian
        dr/d eta_ic = -s_i P_perp d_ic - w_i d_ic^H r (d_ic = Phi_l da_i / d eta_c, W = B G^-1, G = B^H B = C C^H)
        reduced to small matrices: P_perp W = 0 and W^H W = G^-1, so per snapshot
            J^H J = diag(s3)^* (D^H D - D^H B G^-1 B^H D) diag(s3) + (c^* c^T) o (G^-1 (x) 1_33),
            J^H r = -s3^* o c,    with c = D^H r and s3 = s repeated per coordinate (B^H r = 0),
        and J^T J = Re sum_l J^H J, J^T r = Re sum_l J^H r. Each of the three terms is a sum over l of Gram
        matrices, so ONE product per scene over the stacked snapshots gives it:
            sum_l diag(s3)^* D^H D diag(s3) = Dt^H Dt          (Dt_l = D_l diag(s3_l), stacked over l),
            sum_l diag(s3)^* D^H B G^-1 B^H D diag(s3) = F^H F  (F_l = C_l^-1 B_l^H Dt_l),
            sum_l (c^* c^T) o (G^-1 (x) 1_33) = E^H E           (E_l[q, 3i + a] = [C_l^-1]_qi c_l[3i + a]).
        No (L M, 3k) Jacobian and no per-snapshot (3k, 3k) matrix is formed."""
        s3 = s.repeat_interleave(3, -1)  # (B, L, 3k)
        dt = d * s3[:, :, None, :]  # (B, L, M, 3k)
        c = (d.mT @ r.conj()[..., None])[..., 0].conj()  # D^H r (B, L, 3k), without a conjugated copy of d
        n = chol.shape[-1]
        cinv = torch.linalg.solve_triangular(chol, torch.eye(n, dtype=chol.dtype), upper=False)  # (B, L, k, k)
        f = (cinv @ b.mH) @ dt  # (B, L, k, 3k)
        e = cinv.repeat_interleave(3, -1) * c[:, :, None, :]  # (B, L, k, 3k)
        jtj = _gram_real(dt.flatten(1, 2)) - _gram_real(f.flatten(1, 2)) + _gram_real(e.flatten(1, 2))
        return jtj, -(s3.conj() * c).sum(1).real

    def refine(self, x: Tensor, y: Tensor, iters: int, k: Tensor | None = None) -> Tensor:
        """``iters`` LM iterations from the first k[b] sources of x (B, K, 3) on y (B, L, M) complex128 (the rule
        of ``ml_estimator.levenberg_marquardt``; the slots past k do not move). A trial point's columns and
        derivatives come from one GEMM (the columns alone on the last iteration)."""
        bsz, n, _ = x.shape
        if iters <= 0 or bsz == 0:
            return x
        y = y.to(torch.complex128)
        mu = torch.full((bsz,), 1e-3, dtype=torch.float64)
        eye = torch.eye(3 * n, dtype=torch.float64)
        keep = _slots(k, n)
        pad = None if keep is None else torch.diag_embed((~keep).repeat_interleave(3, -1).to(torch.float64))
        b, d = self.columns(x, k)
        r, s, chol = self.project(b, y, k)
        cost = residual_energy(r)
        done = torch.zeros(bsz, dtype=torch.bool)
        for it in range(iters):
            jtj, g = self.normal_equations(b, d, r, s, chol)
            if pad is not None:  # a unit diagonal past k: a zero step there
                jtj = jtj + pad
            damp = mu[:, None, None] * (torch.diagonal(jtj, dim1=-2, dim2=-1)[:, None, :] * eye + 1e-12 * eye)
            step = torch.linalg.solve(jtj + damp, -g[..., None])[..., 0].reshape(bsz, n, 3)
            cand = torch.maximum(torch.minimum(x + step, self.hi), self.lo)
            last = it == iters - 1  # the trial's derivatives are needed only when another iteration follows
            if last:
                b_new = self.plain_columns(cand, k)
            else:
                b_new, d_new = self.columns(cand, k)
            r_new, s_new, chol_new = self.project(b_new, y, k)
            cost_new = residual_energy(r_new)
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


def _slots(k: Tensor | None, n: int) -> Tensor | None:
    """(B, n) bool: slot j holds a source of scene b (j < k[b]); None when every slot of every scene does."""
    if k is None or bool((k >= n).all()):
        return None
    return torch.arange(n) < k[:, None]


def _batch_first(c: Tensor) -> Tensor:
    """(L, M, B, J) complex64 -> (B, L, M, J) complex128, contiguous: the permuted copy on the float view (a
    float32 -> float64 copy vectorises; a complex one with the permutation is ~5x slower)."""
    return torch.view_as_complex(torch.view_as_real(c).permute(2, 0, 1, 3, 4).to(
        torch.float64, memory_format=torch.contiguous_format))


def _gram_real(a: Tensor) -> Tensor:
    """Re(a^H a) = Re(a^T a^*) of (B, P, Q): (B, Q, Q) (a transposed view and a plain conjugate: no strided copy)."""
    return (a.mT @ a.conj()).real


def residual_energy(r: Tensor) -> Tensor:
    """sum over the last two dimensions of |r|^2 (residual energies)."""
    return r.real.square().sum((-2, -1)) + r.imag.square().sum((-2, -1))


__all__ = ["FastRefiner", "residual_energy"]
