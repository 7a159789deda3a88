"""A learned initialiser for the ML refinement: beamformer map -> K_MAX source slots -> Levenberg-Marquardt.

The ML estimator (``ml_estimator``) spends most of its time searching: K_MAX greedy scans of a fine
(phi, theta, r) grid, each followed by a joint refinement, to find a start inside the basin of the global
minimum. This learner replaces the search by one forward pass:
  1. features: the whitened Bartlett map sum_l |u_lg^H W_l y_l|^2 on a COARSE grid (``FeatureMap``; one
     GEMM per snapshot), normalised to unit sum, so the network never sees the raw channel;
  2. an MLP gives K_MAX slots (phi, theta, ln r) and an existence logit per slot;
  3. the slots whose existence probability exceeds 1/2 (at least one) start ONE Levenberg-Marquardt
     refinement of the concentrated ML cost (the same function the ML estimator ends with).
Training (``train_localiser``) is end to end toward positions: a permutation-invariant loss (Hungarian
matching of slots to true sources, Huber on the normalised coordinates of matched slots, binary
cross-entropy on existence), on scenes of the train split with nominal SNR uniform over the evaluated range.
Deterministic: fixed seeds, one thread, data generated in a fixed order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ris_model.config import RunConfig, SceneConfig
from ris_model.ml_estimator import GridDictionary, MLConfig, _box, levenberg_marquardt, operators, whitener
from ris_model.music import Estimates, single_threaded
from ris_model.simulate import System, make_system, simulate

logger = logging.getLogger(__name__)

LOCALISER_FORMAT = 1
LEARNED_SLOTS = "learned slots (no refinement)"
LEARNED_REFINED = "learned init + ML refinement"


@dataclasses.dataclass(frozen=True)
class LocaliserConfig:
    grid_step_deg: float = 4.0  # coarse feature grid (the refinement is continuous)
    n_range: int = 8
    hidden: int = 256
    n_train: int = 8000
    snr_db: tuple[float, float] = (0.0, 30.0)
    epochs: int = 40
    batch: int = 256
    lr: float = 2e-3
    seed: int = 0
    lm_iters: int = 20


class FeatureMap:
    """Whitened Bartlett map on a coarse grid for one channel and code set: y (B, L, M) -> (B, G) float32."""

    def __init__(self, system: System, channel: Tensor, codes: Tensor, scene: SceneConfig, lcfg: LocaliserConfig):
        self.phis = operators(channel[None], codes[None])
        self.w = whitener(self.phis, MLConfig().whiten_delta)
        grid_cfg = MLConfig(grid_step_deg=lcfg.grid_step_deg, n_range=lcfg.n_range)
        self.dictionary = GridDictionary(system, (self.w @ self.phis)[0], scene, grid_cfg)

    @property
    def size(self) -> int:
        return self.dictionary.points.shape[0]

    def __call__(self, y: Tensor) -> Tensor:
        yw = (self.w @ y.to(torch.complex128)[..., None])[..., 0].transpose(0, 1).to(torch.complex64)  # (L, B, M)
        proj = yw @ self.dictionary.cols_h  # (L, B, G)
        m = (proj.real.square() + proj.imag.square()).sum(0)
        return m / m.sum(-1, keepdim=True)


class SlotNet(nn.Module):
    """MLP: normalised map (B, G) -> slots (B, K_MAX, 3) in [-1, 1]^3 and existence logits (B, K_MAX)."""

    def __init__(self, n_in: int, hidden: int, k_max: int):
        super().__init__()
        self.k_max = k_max
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, k_max * 4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(x * x.shape[-1]).reshape(-1, self.k_max, 4)  # x * G: mean 1 per cell
        return torch.tanh(out[..., :3]), out[..., 3]


def _scale(scene: SceneConfig) -> tuple[Tensor, Tensor]:
    lo, hi = _box(scene)
    return (lo + hi) / 2, (hi - lo) / 2


def to_unit(x: Tensor, scene: SceneConfig) -> Tensor:
    """(phi, theta, ln r) -> [-1, 1]^3 over the scene box."""
    mid, half = _scale(scene)
    return ((x - mid) / half).to(torch.float32)


def from_unit(u: Tensor, scene: SceneConfig) -> Tensor:
    mid, half = _scale(scene)
    return u.to(torch.float64) * half + mid


def slot_loss(slots: Tensor, logits: Tensor, target: Tensor, mask: Tensor, delta: float = 0.05) -> Tensor:
    """Permutation-invariant loss: Hungarian matching (L1 cost on unit coordinates) of the K_MAX slots to the
    true sources, Huber on matched coordinates, BCE on existence (1 for matched slots, 0 otherwise)."""
    cost = (slots.detach()[:, :, None] - target[:, None]).abs().sum(-1).numpy()  # (B, slots, sources)
    exist = torch.zeros_like(logits)
    rows, cols, bidx = [], [], []
    for b in range(slots.shape[0]):
        k = int(mask[b].sum())
        r, c = linear_sum_assignment(cost[b, :, :k])
        rows += r.tolist(); cols += c.tolist(); bidx += [b] * k  # noqa: E702
    bidx_t, rows_t, cols_t = torch.tensor(bidx), torch.tensor(rows), torch.tensor(cols)
    exist[bidx_t, rows_t] = 1.0
    pos = nn.functional.huber_loss(slots[bidx_t, rows_t], target[bidx_t, cols_t], delta=delta, reduction="sum")
    return pos / max(len(bidx), 1) / delta + nn.functional.binary_cross_entropy_with_logits(logits, exist)


def _training_set(cfg: RunConfig, system: System, fmap: FeatureMap, lcfg: LocaliserConfig) -> tuple[Tensor, ...]:
    """Maps, unit targets (B, K_MAX, 3) and masks of ``n_train`` train-split scenes, SNR uniform in lcfg.snr_db."""
    c = dataclasses.replace(cfg, scene=dataclasses.replace(cfg.scene, snr_db=lcfg.snr_db))
    feats, targets, masks = [], [], []
    for start in range(0, lcfg.n_train, 500):
        d = simulate(c, system, "train", list(range(start, min(start + 500, lcfg.n_train))))
        feats.append(fmap(d["y"]))
        x = torch.stack([d["phi"], d["theta"], d["r"].log()], -1)
        targets.append(to_unit(x, cfg.scene))
        masks.append(d["mask"])
    return torch.cat(feats), torch.cat(targets), torch.cat(masks)


def train_localiser(cfg: RunConfig, lcfg: LocaliserConfig, out: Path) -> Path:
    """Train the slot network (deterministic on one thread) and save it to ``out`` (state dict + configs)."""
    torch.manual_seed(lcfg.seed)
    system = make_system(cfg)
    t0 = time.perf_counter()
    with single_threaded():
        fmap = FeatureMap(system, system.channel, system.codes, cfg.scene, lcfg)
        feats, targets, masks = _training_set(cfg, system, fmap, lcfg)
        logger.info("localiser: %d training maps of %d cells in %.0f s", feats.shape[0], fmap.size,
                    time.perf_counter() - t0)
        net = SlotNet(fmap.size, lcfg.hidden, cfg.scene.k_max)
        opt = torch.optim.AdamW(net.parameters(), lr=lcfg.lr, weight_decay=1e-4)
        steps = lcfg.epochs * math.ceil(feats.shape[0] / lcfg.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lcfg.lr, total_steps=steps)
        gen = torch.Generator().manual_seed(lcfg.seed)
        for epoch in range(lcfg.epochs):
            perm, total = torch.randperm(feats.shape[0], generator=gen), 0.0
            for i in range(0, feats.shape[0], lcfg.batch):
                idx = perm[i:i + lcfg.batch]
                slots, logits = net(feats[idx])
                loss = slot_loss(slots, logits, targets[idx], masks[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            logger.info("localiser epoch %d: loss %.4f (%.0f s)", epoch, total / feats.shape[0], time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": LOCALISER_FORMAT, "lcfg": dataclasses.asdict(lcfg), "seed": cfg.data.seed,
                "state": {k: v.half() for k, v in net.state_dict().items()},
                "train_seconds": time.perf_counter() - t0}, out)
    return out


class Localiser:
    """Inference: y -> map -> slots -> K -> one LM refinement; called on a ``simulate`` dict by the benchmark."""

    def __init__(self, ckpt: dict, cfg: RunConfig, system: System):
        self.lcfg = LocaliserConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["lcfg"].items()})
        self.cfg, self.system = cfg, system
        self.fmap = FeatureMap(system, system.channel, system.codes, cfg.scene, self.lcfg)
        self.net = SlotNet(self.fmap.size, self.lcfg.hidden, cfg.scene.k_max)
        self.net.load_state_dict({k: v.float() for k, v in ckpt["state"].items()})
        self.net.eval()
        self.meta = {"config": dataclasses.asdict(self.lcfg), "train_seconds": round(float(ckpt["train_seconds"]), 1),
                     "parameters": sum(p.numel() for p in self.net.parameters()), "trained_on_seed": ckpt["seed"]}

    @torch.no_grad()
    def __call__(self, data: dict) -> dict[str, tuple[Estimates, Tensor, float]]:
        """Two methods on the scenes of ``data``: the network's slots alone, and the slots refined by LM."""
        k_max = self.cfg.scene.k_max
        t0 = time.perf_counter()
        with single_threaded():
            slots, logits = self.net(self.fmap(data["y"]))
            order = logits.argsort(-1, descending=True)  # most confident slots first
            x0 = torch.gather(from_unit(slots, self.cfg.scene), 1, order[..., None].expand(-1, -1, 3))
            k = (logits > 0).sum(-1).clamp_min(1)
            t_net = time.perf_counter() - t0
            x_fit = x0.clone()
            lo, hi = _box(self.cfg.scene)
            y = data["y"].to(torch.complex128)
            for kk in range(1, k_max + 1):
                sel = k == kk
                if sel.any():
                    x_fit[sel, :kk] = levenberg_marquardt(x0[sel, :kk], self.fmap.phis, y[sel], self.system, lo, hi,
                                                          self.lcfg.lm_iters)
        total = time.perf_counter() - t0
        mask = torch.arange(k_max)[None] < k[:, None]

        def est(x: Tensor) -> Estimates:
            r = torch.where(mask, x[..., 2].exp(), torch.ones_like(x[..., 2]))
            return Estimates(x[..., 0], x[..., 1], r, mask, mask.sum(-1))

        return {LEARNED_SLOTS: (est(x0), k, t_net), LEARNED_REFINED: (est(x_fit), k, total)}


def load_localiser(path: str | Path, cfg: RunConfig) -> tuple[Localiser, str]:
    """The localiser of a checkpoint and a tag naming it (file hash) for the benchmark cache."""
    raw = Path(path).read_bytes()
    ckpt = torch.load(path, weights_only=False)
    if ckpt.get("format") != LOCALISER_FORMAT:
        raise ValueError(f"{path}: not a learned-initialiser checkpoint (format {ckpt.get('format')}, expected "
                         f"{LOCALISER_FORMAT}); train one with `python -m ris_model traininit`")
    return Localiser(ckpt, cfg, make_system(cfg)), hashlib.sha256(raw).hexdigest()[:12]


__all__ = ["LEARNED_SLOTS", "LEARNED_REFINED", "LocaliserConfig", "FeatureMap", "SlotNet", "slot_loss", "train_localiser", "Localiser", "load_localiser",
           "to_unit", "from_unit"]
