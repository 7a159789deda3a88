"""Parameter-free evidence for the number of sources, taken in the measurement domain (greedy residuals).

R_samp cannot show K in its eigenvalues: every snapshot adds one rank-1 term, so it has L non-zero
eigenvalues whatever K is. The measurements themselves can: snapshot l is y_l = sum_k s_kl b_l(a_k) + n_l
with b_l(a) = Phi_l a = H diag(c_l) a (an M-vector), so once the K columns b_l(a_k) are projected out of
every y_l only noise remains, (M - k) sigma^2 per snapshot.

Orthogonal matching pursuit on a coarse (phi, theta, r) grid (the readout grid): at step k the cell whose
unit columns b_l(a_g) / ||b_l(a_g)|| capture most residual energy summed over the L snapshots is added
to each snapshot's basis (Gram-Schmidt), and the residual energy r_k = sum_l ||P_perp y_l||^2 is kept.
The feature is log(r_k / (L (M - k) sigma2_hat)) for k = 0..K_MAX, with sigma2_hat = ||y||^2 / (L M (1 + snr))
from the sample's SNR: about 0 once k >= K (noise only, plus grid mismatch), large while k < K.
No parameters, no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GreedyResidual(nn.Module):
    """OMP residual curve (B, K_MAX + 1) from measurements y (B, L, M); see the module docstring.

    cells (G, N): steering vectors of the grid cells; measurement_maps(channel, codes) gives the columns.
    With a fixed channel the (L, G, M) columns are computed once; with per-sample channels they are formed
    per batch (B L G N M multiply-adds: slow, but exact).
    """

    def __init__(self, cells: Tensor, k_max: int, fixed: tuple[Tensor, Tensor] | None, cdtype: torch.dtype):
        super().__init__()
        self.k_max = k_max
        self.register_buffer("cells", cells.to(cdtype), persistent=False)
        self.fixed = fixed is not None
        if fixed is not None:
            self.register_buffer("cols", self.columns(fixed[0][None], fixed[1][None])[0].to(cdtype),
                                 persistent=False)

    def columns(self, channel: Tensor, codes: Tensor) -> Tensor:
        """Unit columns b_l(a_g) / ||b_l(a_g)||: (B, L, G, M) for channel (B, M, N), codes (B, L, N)."""
        cells = self.cells.to(channel.dtype)
        b = torch.einsum("gn,bln,bmn->blgm", cells, codes.to(channel.dtype), channel)
        return b / b.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(b.real.dtype).tiny)

    @torch.no_grad()
    def forward(self, y: Tensor, channel: Tensor, codes: Tensor, snr_db: Tensor) -> Tensor:
        b, L, m = y.shape
        cols = (self.cols[None] if self.fixed else self.columns(channel, codes)).to(y.dtype)
        cols_h = cols.conj().transpose(-1, -2)  # (B|1, L, M, G)
        res, basis = y, []
        energy = [(res.abs() ** 2).sum((-2, -1))]
        rows = torch.arange(b, device=y.device)
        for _ in range(self.k_max):
            if self.fixed:  # one GEMM per snapshot over the whole batch: (L, B, M) @ (L, M, G)
                proj = res.transpose(0, 1) @ cols_h[0]
            else:
                proj = (res[:, :, None, :] @ cols_h)[:, :, 0].transpose(0, 1)
            score = torch.view_as_real(proj).square().sum((0, -1))  # (B, G): sum_l |b_lg^H r_l|^2
            pick = cols.expand(b, -1, -1, -1)[rows, :, score.argmax(-1)]  # (B, L, M)
            for q in basis:
                pick = pick - q * (q.conj() * pick).sum(-1, keepdim=True)
            q = pick / pick.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(pick.real.dtype).tiny)
            basis.append(q)
            res = res - q * (q.conj() * res).sum(-1, keepdim=True)
            energy.append((res.abs() ** 2).sum((-2, -1)))
        total = energy[0]
        sigma2 = total / (L * m * (1 + 10 ** (snr_db.to(total.dtype) / 10)))
        dof = L * (m - torch.arange(self.k_max + 1, device=y.device, dtype=total.dtype)).clamp_min(1)
        ratio = torch.stack(energy, -1) / (dof * sigma2[:, None])
        return torch.log(ratio.clamp_min(torch.finfo(ratio.dtype).tiny))


__all__ = ["GreedyResidual"]
