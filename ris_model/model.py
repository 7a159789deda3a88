"""The network: one token per snapshot -> small Transformer encoder -> mean-pool -> named heads.

Input processing (fixed, no parameters, no gradient): each snapshot is back-projected to the RIS,
xhat_l = Phi_l^H (Phi_l Phi_l^H + eps I)^-1 y_l with Phi_l = H diag(c_l) (the map R_samp is made of);
R_hat = (1/L) sum_l xhat_l xhat_l^H, trace 1, equals the batch's R_samp.

Token l (docs/physics.md section 3) holds y_l normalised by the sample's RMS (covariances are trace-normalised,
so the scale carries nothing), the code c_l compressed by a learned linear projection of its real/imag
parts, the SNR (dB / 10), and the snapshot's energy |a_g^H xhat_l|^2 on a coarse (phi, theta, r) grid in
log scale (``model.beam_grid``; [0, 0, 0] drops it); a per-sample channel adds a learned projection of H.
Tokens -> Transformer encoder (pre-norm) -> mean over snapshots -> context h.

Heads: k_logits (B, K_MAX) from h and the log eigenvalues of R_hat (logit j means K = j + 1);
aux (B, K_MAX, 3) = (phi, theta, r) per slot in radians/metres; cov_fact_angle, cov_fact_range
(B, N, K_MAX) complex. Slot positions come from ``model.position_head``:
  "spectral": a learned readout of grid spectra of R_hat. On a (phi, theta, r) grid
      (``model.readout_grid``) it forms 2 K_MAX + 1 phase-invariant maps: |u_j^H a_g|^2 for the top K_MAX
      eigenvectors u_j, the MUSIC log-spectra -log(1 - sum_{j<=k} |u_j^H a_g|^2) for k = 1..K_MAX, and the
      log Bartlett spectrum a_g^H R_hat a_g; each is standardised over the grid. Slot k scores every cell
      by a mix of the maps (weights = a learned base + a function of h) plus a learned per-cell bias, minus
      a learned suppression around the slots before it (a soft non-maximum suppression), and takes the
      softmax-weighted mean of the cell coordinates (phi, theta, ln r) plus a bounded learned offset.
      Initialised to pick Bartlett peaks one after another, so it starts as a classical estimator;
  "regress": an MLP on h with outputs squashed into the scene's intervals.
Factors (``model.factor_head``):
  "steering": column k = sqrt(w_k) a(phi_k, theta_k, r_k) (angle factor) and sqrt(w_k) a(phi_k, theta_k,
      r_k exp(s_k)) (range factor): a two-point model of the range uncertainty, range being the coordinate
      the near field resolves worst;
  "direct": free complex matrices from a linear head on h, columns scaled by sqrt(w_k).
w_k = P(K > k) softplus(power_k): slot k carries the K head's probability that it holds a source times
a learned power, so R_pred is the expected covariance under the predicted K (P(K > k) is detached: the
K head learns from k_ce only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ris_model.complex_ops import complex_dtype, pack, trace_normalise
from ris_model.config import RunConfig, SceneConfig
from ris_model.geometry import direction, steering
from ris_model.numerics import degenerate_tol
from ris_model.simulate import System, backprojection


@dataclass(frozen=True)
class ModelOutputs:
    """The network's named outputs. Complex factors follow the parameter dtype (complex64 for fp32)."""

    cov_fact_angle: Tensor  # (B, N, K_MAX) complex
    cov_fact_range: Tensor  # (B, N, K_MAX) complex
    k_logits: Tensor  # (B, K_MAX)
    aux: Tensor  # (B, K_MAX, 3): phi (rad), theta (rad), r (m)

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def cell_grid(scene: SceneConfig, counts: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Flattened cell centres (phi, theta in radians, r in metres) of a (phi, theta, log r) grid."""
    def centres(lo: float, hi: float, n: int) -> Tensor:
        return lo + (hi - lo) * (torch.arange(n, dtype=torch.float64) + 0.5) / n

    phi = torch.deg2rad(centres(*scene.phi_deg, counts[0]))
    theta = torch.deg2rad(centres(*scene.theta_deg, counts[1]))
    r = torch.exp(centres(math.log(scene.range_m[0]), math.log(scene.range_m[1]), counts[2]))
    p, t, rr = torch.meshgrid(phi, theta, r, indexing="ij")
    return p.reshape(-1), t.reshape(-1), rr.reshape(-1)


class BackProjection(nn.Module):
    """xhat_l = G_l y_l (B, L, N) without gradient; G from the system (fixed channel) or per sample."""

    def __init__(self, cfg: RunConfig, system: System, cdtype: torch.dtype):
        super().__init__()
        self.per_sample, self.eps = cfg.channel.per_sample, cfg.channel.backproj_eps
        if not self.per_sample:
            g = backprojection(system.channel[None] * system.codes[:, None, :], self.eps)  # (L, N, M)
            self.register_buffer("g", g.to(cdtype), persistent=False)

    @torch.no_grad()
    def forward(self, y: Tensor, codes: Tensor, channel: Tensor) -> Tensor:
        g = backprojection(channel[:, None] * codes[:, :, None, :], self.eps) if self.per_sample else self.g[None]
        return (g.to(y.dtype) @ y[..., None])[..., 0]


class SnapshotTokens(nn.Module):
    """Per-snapshot token embedding (B, L, d_model)."""

    def __init__(self, cfg: RunConfig, system: System, dtype: torch.dtype):
        super().__init__()
        m, n, d = cfg.geometry.n_bs, cfg.geometry.n_ris, cfg.model.d_model
        self.code = nn.Linear(2 * n, cfg.model.code_dim, dtype=dtype)
        self.use_beams = cfg.model.beam_grid[0] > 0
        n_beam = math.prod(cfg.model.beam_grid) if self.use_beams else 0
        self.embed = nn.Linear(2 * m + cfg.model.code_dim + 1 + n_beam, d, dtype=dtype)
        self.channel = nn.Linear(2 * m * n, d, dtype=dtype) if cfg.channel.per_sample else None
        if self.use_beams:
            grid = system.steer(*cell_grid(cfg.scene, cfg.model.beam_grid))  # (G, N)
            self.register_buffer("beams", grid.T.conj().to(complex_dtype(dtype)), persistent=False)

    def forward(self, y: Tensor, xhat: Tensor, codes: Tensor, channel: Tensor, snr_db: Tensor) -> Tensor:
        b, L, _ = y.shape
        parts = [pack(y).flatten(-2), self.code(pack(codes).flatten(-2).to(self.code.weight.dtype)),
                 (snr_db / 10)[:, None, None].expand(b, L, 1)]
        if self.use_beams:
            with torch.no_grad():
                e = (xhat @ self.beams.to(xhat.dtype)).abs() ** 2  # (B, L, G)
                parts.append(torch.log1p(e / e.mean(dim=(-2, -1), keepdim=True)))
        dtype = self.embed.weight.dtype
        tok = self.embed(torch.cat([p.to(dtype) for p in parts], dim=-1))
        if self.channel is not None:
            tok = tok + self.channel(pack(channel).flatten(-3).to(dtype))[:, None, :]
        return tok


def _standardise(x: Tensor) -> Tensor:
    """Zero mean, unit standard deviation over the last dim (a constant map stays zero)."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.std(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).eps)


class SpectralReadout(nn.Module):
    """Slot positions from grid spectra of R_hat (see the module docstring, position_head = "spectral")."""

    def __init__(self, cfg: RunConfig, system: System, d_ctx: int, dtype: torch.dtype):
        super().__init__()
        mc, self.k_max = cfg.model, cfg.scene.k_max
        phi, theta, r = cell_grid(cfg.scene, mc.readout_grid)
        self.n_maps = 2 * self.k_max + 1
        self.register_buffer("steer", system.steer(phi, theta, r).T.to(complex_dtype(dtype)), persistent=False)
        self.register_buffer("coords", torch.stack([phi, theta, r.log()], -1).to(dtype), persistent=False)
        self.register_buffer("dirs", direction(phi, theta).to(dtype), persistent=False)  # (G, 3)
        span = torch.tensor([math.radians(cfg.scene.phi_deg[1] - cfg.scene.phi_deg[0]),
                             math.radians(cfg.scene.theta_deg[1] - cfg.scene.theta_deg[0]),
                             math.log(cfg.scene.range_m[1] / cfg.scene.range_m[0])])
        self.register_buffer("half_cell", (span / torch.tensor(mc.readout_grid) / 2).to(dtype), persistent=False)
        base = torch.zeros(self.k_max, self.n_maps, dtype=dtype)
        base[:, -1] = 1.0  # start on the Bartlett map
        self.base = nn.Parameter(base)
        self.mix = nn.Linear(d_ctx, self.k_max * self.n_maps, dtype=dtype)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)
        self.cell_bias = nn.Parameter(torch.zeros(self.k_max, phi.shape[0], dtype=dtype))
        self.log_temp = nn.Parameter(torch.tensor(math.log(mc.readout_temperature), dtype=dtype))
        self.log_supp = nn.Parameter(torch.tensor(math.log(4 * mc.readout_temperature), dtype=dtype))
        self.log_width = nn.Parameter(torch.tensor(math.log(math.radians(mc.readout_suppression_deg)), dtype=dtype))

    @torch.no_grad()
    def maps(self, vecs: Tensor, lam: Tensor) -> Tensor:
        """(B, 2 K_MAX + 1, G) standardised maps from eigenvectors (B, N, J) and eigenvalues (B, J), descending."""
        proj = (vecs.mH @ self.steer.to(vecs.dtype)).abs() ** 2  # (B, J, G): |u_j^H a_g|^2
        top = proj[:, : self.k_max]
        floor = torch.finfo(proj.dtype).eps
        music = -torch.log((1 - top.cumsum(1)).clamp_min(floor))
        bartlett = torch.log((lam[:, :, None] * proj).sum(1, keepdim=True).clamp_min(floor))
        return _standardise(torch.cat([top, music, bartlett], dim=1))

    def forward(self, maps: Tensor, ctx: Tensor, offset: Tensor) -> Tensor:
        """Positions (B, K_MAX, 3) as (phi, theta, ln r); offset (B, K_MAX, 3) raw, bounded here."""
        weights = self.base + self.mix(ctx).reshape(-1, self.k_max, self.n_maps)  # (B, K_MAX, C)
        score = weights.to(maps.dtype) @ maps + self.cell_bias  # (B, K_MAX, G)
        temp, supp, width = self.log_temp.exp(), self.log_supp.exp(), self.log_width.exp()
        taken = torch.zeros_like(score[:, 0])  # (B, G): suppression from earlier slots
        out = []
        for k in range(self.k_max):
            prob = torch.softmax(temp * score[:, k] - supp * taken, dim=-1)
            pos = prob @ self.coords
            out.append(pos)
            u = direction(pos[:, 0].detach(), pos[:, 1].detach())  # (B, 3): suppress around this slot
            ang = torch.acos((u @ self.dirs.T).clamp(-1, 1))
            taken = taken + torch.exp(-0.5 * (ang / width) ** 2)
        return torch.stack(out, dim=1) + self.half_cell * torch.tanh(offset)


class RISNet(nn.Module):
    """Snapshot tokens -> Transformer encoder -> mean-pool -> heads (see the module docstring)."""

    def __init__(self, cfg: RunConfig, system: System):
        super().__init__()
        mc, sc = cfg.model, cfg.scene
        self.dtype = dtype = getattr(torch, cfg.data.dtype)
        self.k_max, self.n, self.head_kind = sc.k_max, cfg.geometry.n_ris, mc.factor_head
        self.n_eig = min(cfg.channel.snapshots, self.n)  # rank(R_hat) <= L
        self.backproject = BackProjection(cfg, system, complex_dtype(dtype))
        self.tokens = SnapshotTokens(cfg, system, dtype)
        layer = nn.TransformerEncoderLayer(mc.d_model, mc.n_heads, mc.d_ff, mc.dropout, activation="gelu",
                                           batch_first=True, norm_first=True, dtype=dtype)
        self.encoder = nn.TransformerEncoder(layer, mc.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(mc.d_model, dtype=dtype)
        d_ctx = mc.d_model + self.n_eig
        self.k_head = nn.Sequential(nn.Linear(d_ctx, mc.factor_hidden, dtype=dtype), nn.GELU(),
                                    nn.Linear(mc.factor_hidden, sc.k_max, dtype=dtype))
        self.slot_head = nn.Sequential(nn.Linear(d_ctx, mc.factor_hidden, dtype=dtype), nn.GELU(),
                                       nn.Linear(mc.factor_hidden, sc.k_max * 5, dtype=dtype))
        self.readout = SpectralReadout(cfg, system, d_ctx, dtype) if mc.position_head == "spectral" else None
        if mc.factor_head == "direct":
            self.factor_head = nn.Linear(d_ctx, 2 * 2 * self.n * sc.k_max, dtype=dtype)
        self.register_buffer("positions", system.positions.to(dtype), persistent=False)
        self.wavelength, self.fresnel, self.max_spread = system.wavelength, system.fresnel, mc.range_spread
        lims = [torch.deg2rad(torch.tensor(sc.phi_deg)), torch.deg2rad(torch.tensor(sc.theta_deg)),
                torch.tensor(sc.range_m).log()]
        self.register_buffer("lims", torch.stack(lims, -1).to(dtype), persistent=False)  # (2, 3): low, high

    def _steer(self, phi: Tensor, theta: Tensor, r: Tensor) -> Tensor:
        """(B, N, K_MAX) steering columns in the parameter precision (also under bf16 autocast)."""
        return steering(self.positions, self.wavelength, phi, theta, r, fresnel=self.fresnel).transpose(-1, -2)

    @torch.no_grad()
    def _spectrum(self, xhat: Tensor) -> tuple[Tensor, Tensor]:
        """Eigenvalues (B, J) and eigenvectors (B, N, J) of R_hat, descending, J = min(L, N)."""
        r_hat = trace_normalise(xhat.transpose(-1, -2) @ xhat.conj() / xhat.shape[1], "R_hat")
        lam, vecs = torch.linalg.eigh(0.5 * (r_hat + r_hat.mH))
        return lam.flip(-1)[:, : self.n_eig], vecs.flip(-1)[..., : self.n_eig]

    def forward(self, batch) -> ModelOutputs:
        y = batch.y / (batch.y.abs() ** 2).mean(dim=(-2, -1), keepdim=True).sqrt()
        xhat = self.backproject(y, batch.codes, batch.channel)
        lam, vecs = self._spectrum(xhat)
        log_lam = torch.log(lam.clamp_min(degenerate_tol(lam.dtype, self.n) * lam[:, :1]))
        h = self.norm(self.encoder(self.tokens(y, xhat, batch.codes, batch.channel, batch.snr_db)).mean(dim=1))
        ctx = torch.cat([h.to(self.dtype), log_lam.to(self.dtype)], dim=-1)
        # Under AMP only the encoder runs in reduced precision: heads, positions and factors stay in the
        # parameter precision (bf16 would quantise angles to ~0.2 degrees).
        with torch.autocast(y.device.type, enabled=False):
            return self._heads(ctx, vecs, lam)

    def _heads(self, ctx: Tensor, vecs: Tensor, lam: Tensor) -> ModelOutputs:
        k_logits = self.k_head(ctx)
        slots = self.slot_head(ctx).reshape(-1, self.k_max, 5)
        if self.readout is not None:
            pos = self.readout(self.readout.maps(vecs, lam), ctx, slots[..., :3])
            pos = torch.minimum(torch.maximum(pos, self.lims[0]), self.lims[1])
        else:
            pos = self.lims[0] + (self.lims[1] - self.lims[0]) * torch.sigmoid(slots[..., :3])
        phi, theta, r = pos[..., 0], pos[..., 1], pos[..., 2].exp()
        # P(K > k) for slot k; detached so that the covariance terms cannot bend the K classifier (trained by
        # k_ce alone) towards whatever K makes R_pred fit best.
        active = torch.softmax(k_logits.detach(), dim=-1).flip(-1).cumsum(-1).flip(-1)
        w = (active * nn.functional.softplus(slots[..., 3])).sqrt()[:, None, :]  # (B, 1, K_MAX)
        if self.head_kind == "steering":
            spread = self.max_spread * torch.tanh(slots[..., 4])
            f_ang = self._steer(phi, theta, r) * w
            f_rng = self._steer(phi, theta, r * spread.exp()) * w
        else:
            raw = self.factor_head(ctx).reshape(-1, 2, self.n, self.k_max, 2)
            z = torch.view_as_complex(raw) / math.sqrt(self.n)
            f_ang, f_rng = z[:, 0] * w, z[:, 1] * w
        aux = torch.stack([phi, theta, r], dim=-1)
        return ModelOutputs(cov_fact_angle=f_ang, cov_fact_range=f_rng, k_logits=k_logits, aux=aux)


def build_model(cfg: RunConfig, system: System) -> RISNet:
    """The network of ``cfg``, initialised from ``cfg.train.seed`` (same seed -> same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return RISNet(cfg, system)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
