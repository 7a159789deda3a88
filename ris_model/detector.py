"""A permutation-free source detector on the beamformer map (CenterNet style): network, targets, loss, decode.

Input: the whitened Bartlett map (``beam_map.BeamMap.image``), one channel per range plane over the
(phi, theta) grid, log-scaled. A small fully convolutional network gives per (phi, theta) cell:
  - a heat logit: "a source's nearest grid cell is this one";
  - the sub-cell offsets of that source in phi and theta (cells) and its ln r mapped to [-1, 1].
Training targets: a Gaussian bump of ``sigma_cells`` around each source, exactly 1 at its nearest cell;
the penalty-reduced focal loss of CenterNet (Zhou et al. 2019) on the heat, Huber on the offsets and ln r
at the sources' cells only. No slot, no assignment: K comes out as the number of peaks above a threshold.
Decode: 3 x 3 local maxima of the heat above the threshold, at most K_MAX (the most confident), at least one.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ris_model.config import SceneConfig
from ris_model.music import Estimates
from ris_model.numerics import tiny_of

DETECTOR_FORMAT = 2  # checkpoint layout: dcfg, state, pipeline (per L: heat, second, tau), history, train_seconds
FOCAL_ALPHA = 2.0  # CenterNet's focusing exponent
FOCAL_BETA = 4.0  # CenterNet's penalty reduction near a source


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Grid, network, training and refinement of the learned detector (see ``detector_train``)."""

    grid_step_deg: float = 3.0  # (phi, theta) cells of the map and of the heatmap
    n_range: int = 8  # range planes of the map (input channels)
    width: int = 32  # convolution channels
    sigma_cells: float = 1.0  # Gaussian of the heat target
    train_seeds: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)  # channel seeds of training; the test seed 0 is unseen
    snapshots: tuple[int, ...] = (16, 64)  # L of the training systems (one system per seed and L)
    share_l64: float = 0.25  # fraction of the training scenes at the largest L
    snr_db: tuple[float, float] = (0.0, 30.0)  # nominal SNR of training scenes, uniform
    scenes_per_epoch: int = 4000  # fresh scenes (positions, symbols, noise) every epoch
    epochs: int = 15
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0
    n_val: int = 400  # validation scenes (train seeds, val split) for the threshold
    lm_iters: int = 3  # Levenberg-Marquardt iterations of the ML cost per refinement (speed: docs/evaluation.md)


class HeatNet(nn.Module):
    """(B, R, P, T) log map -> (B, 4, P, T): heat logit, offset phi, offset theta (cells), ln r in [-1, 1]."""

    def __init__(self, n_range: int, width: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = n_range
        for dil in (1, 2, 4, 1):  # receptive field 17 cells: a source's main lobe and first sidelobes
            layers += [nn.Conv2d(c_in, width, 3, padding=dil, dilation=dil), nn.GELU()]
            c_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, 4, 1)
        nn.init.constant_(self.head.bias[:1], -4.0)  # sources are rare: start the heat near p = 0.02

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.body(x)).contiguous()  # channels-last at inference: tanh on strided slices is 4x slower
        return torch.cat([out[:, :1], torch.tanh(out[:, 1:3]) * 0.5, torch.tanh(out[:, 3:])], 1)


def log_map(image: Tensor) -> Tensor:
    """The network's input: ln of the mean-normalised map (a power: > 0 for any noisy measurement)."""
    return image.clamp_min(tiny_of(image.dtype)).log()


def _axes(scene: SceneConfig) -> tuple[float, float]:
    return scene.phi_deg[0], scene.theta_deg[0]


def _lnr_unit(r: Tensor, scene: SceneConfig) -> Tensor:
    lo, hi = math.log(scene.range_m[0]), math.log(scene.range_m[1])
    return (r.log() - (lo + hi) / 2) / ((hi - lo) / 2)


def _lnr_from_unit(u: Tensor, scene: SceneConfig) -> Tensor:
    lo, hi = math.log(scene.range_m[0]), math.log(scene.range_m[1])
    return u * ((hi - lo) / 2) + (lo + hi) / 2


def targets(phi: Tensor, theta: Tensor, r: Tensor, mask: Tensor, shape: tuple[int, int], scene: SceneConfig,
            step_deg: float, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
    """Heat target (B, P, T) in [0, 1] (1 at each source's nearest cell), regression target (B, 3, P, T)
    (offset phi, offset theta in cells, ln r in [-1, 1]) and the positive-cell mask (B, P, T) bool."""
    p, t = shape
    phi0, theta0 = _axes(scene)
    fi = (torch.rad2deg(phi) - phi0) / step_deg  # (B, K) fractional cell coordinates
    fj = (torch.rad2deg(theta) - theta0) / step_deg
    ci, cj = fi.round().clamp(0, p - 1).long(), fj.round().clamp(0, t - 1).long()
    gi = torch.arange(p, dtype=fi.dtype)[None, None, :, None]
    gj = torch.arange(t, dtype=fj.dtype)[None, None, None, :]
    bump = torch.exp(-((gi - fi[..., None, None]) ** 2 + (gj - fj[..., None, None]) ** 2) / (2 * sigma ** 2))
    heat = torch.where(mask[..., None, None], bump, torch.zeros_like(bump)).amax(1)  # (B, P, T)
    b_idx, k_idx = mask.nonzero(as_tuple=True)
    pos = torch.zeros(phi.shape[0], p, t, dtype=torch.bool)
    pos[b_idx, ci[b_idx, k_idx], cj[b_idx, k_idx]] = True
    heat = torch.where(pos, torch.ones_like(heat), heat)
    reg = torch.zeros(phi.shape[0], 3, p, t, dtype=torch.float32)
    vals = torch.stack([fi - ci, fj - cj, _lnr_unit(r, scene)], -1)[b_idx, k_idx].float()  # (S, 3)
    reg[b_idx, :, ci[b_idx, k_idx], cj[b_idx, k_idx]] = vals
    return heat.float(), reg, pos


def detector_loss(out: Tensor, heat: Tensor, reg: Tensor, pos: Tensor, delta: float = 0.1) -> dict[str, Tensor]:
    """Penalty-reduced focal loss on the heat (per source) and Huber on the regression at positive cells."""
    logit = out[:, 0]
    logp, log1mp = nn.functional.logsigmoid(logit), nn.functional.logsigmoid(-logit)
    prob = logp.exp()
    n_pos = pos.sum().clamp_min(1)
    pos_term = -((1 - prob) ** FOCAL_ALPHA * logp)[pos].sum()
    neg_w = (1 - heat) ** FOCAL_BETA * prob ** FOCAL_ALPHA
    neg_term = -(neg_w * log1mp)[~pos].sum()
    pred = out[:, 1:].permute(0, 2, 3, 1)[pos]  # (S, 3)
    tgt = reg.permute(0, 2, 3, 1)[pos]
    reg_term = nn.functional.huber_loss(pred, tgt, delta=delta, reduction="sum") / delta / n_pos
    return {"heat": (pos_term + neg_term) / n_pos, "reg": reg_term}


@torch.no_grad()
def decode(out: Tensor, threshold: float, k_max: int, scene: SceneConfig, step_deg: float
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Peaks of the heat: positions x (B, k_max, 3) = (phi, theta, ln r) float64 and scores (B, k_max), most
    confident first, and k (B,) = the number of peaks above ``threshold`` (1 <= k <= k_max; the first k are used)."""
    b, _, p, t = out.shape
    prob = torch.sigmoid(out[:, 0])
    peak = prob == nn.functional.max_pool2d(prob[:, None], 3, stride=1, padding=1)[:, 0]
    score = torch.where(peak, prob, torch.zeros_like(prob)).reshape(b, -1)
    top, idx = score.topk(k_max, -1)  # (B, k_max), descending
    ci, cj = idx // t, idx % t
    reg = out[:, 1:].reshape(b, 3, -1)
    sel = torch.gather(reg, 2, idx[:, None].expand(-1, 3, -1))  # (B, 3, k_max)
    phi0, theta0 = _axes(scene)
    phi = torch.deg2rad(phi0 + (ci + sel[:, 0].double()) * step_deg)
    theta = torch.deg2rad(theta0 + (cj + sel[:, 1].double()) * step_deg)
    x = torch.stack([phi, theta, _lnr_from_unit(sel[:, 2].double(), scene)], -1)
    k = (top > threshold).sum(-1).clamp_min(1)
    return x, top, k


def peak_estimates(x: Tensor, k: Tensor, k_max: int) -> Estimates:
    """Estimates of the first k[b] positions of x (B, k_max, 3) = (phi, theta, ln r)."""
    mask = torch.arange(k_max)[None] < k[:, None]
    r = torch.where(mask, x[..., 2].exp(), torch.ones_like(x[..., 2]))
    return Estimates(x[..., 0], x[..., 1], r, mask, mask.sum(-1))


__all__ = ["DETECTOR_FORMAT", "peak_estimates", "DetectorConfig", "HeatNet", "log_map", "targets", "detector_loss", "decode"]
