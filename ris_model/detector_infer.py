"""The learned pipeline at inference: beamformer map -> detector peaks -> a short ML refinement.

For the benchmark's system (any channel, any L; the detector was trained on other channels):
  1. the whitened Bartlett map of the scene (``beam_map``) and one pass of the detector (``detector``);
  2. K = the peaks above the threshold tuned for this L (``detector_train.tune_thresholds``), their
     positions from the cell plus the regressed offsets and ln r;
  3. ``lm_iters`` Levenberg-Marquardt iterations of the concentrated ML cost (the function the ML
     estimator ends with, ``ml_estimator.levenberg_marquardt``) on all K sources jointly.
Two methods are reported: the peaks alone, and the peaks refined.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import torch

from ris_model.beam_map import BeamMap
from ris_model.config import RunConfig
from ris_model.detector import DetectorConfig, HeatNet, decode, log_map
from ris_model.detector_train import DETECTOR_FORMAT, peak_estimates
from ris_model.ml_estimator import _box, levenberg_marquardt
from ris_model.music import Estimates, single_threaded
from ris_model.simulate import System, make_system

NET_CHUNK = 25  # scenes per forward pass at inference
DETECTOR_PEAKS = "learned detector peaks (no refinement)"
DETECTOR_REFINED = "learned detector + ML refinement"


class DetectorError(ValueError):
    """A checkpoint that is not a detector, or one without a threshold for the system's L."""


def detector_config(raw: dict) -> DetectorConfig:
    return DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


class LearnedDetector:
    """Inference on a ``simulate`` dict of the system's scenes: {method: (Estimates, K used, seconds)}."""

    def __init__(self, ckpt: dict, cfg: RunConfig, system: System, lm_iters: int | None = None):
        self.dcfg = detector_config(ckpt["dcfg"])
        self.cfg, self.system = cfg, system
        self.lm_iters = self.dcfg.lm_iters if lm_iters is None else lm_iters
        L = system.codes.shape[0]
        if str(L) not in ckpt["thresholds"]:
            raise DetectorError(f"detector checkpoint has thresholds for L in {sorted(ckpt['thresholds'])}, not for "
                                f"the system's L = {L}; retrain with snapshots including {L}")
        self.threshold = float(ckpt["thresholds"][str(L)]["threshold"])
        self.bmap = BeamMap(system, cfg.scene, self.dcfg.grid_step_deg, self.dcfg.n_range)
        self.net = HeatNet(self.dcfg.n_range, self.dcfg.width)
        self.net.load_state_dict(ckpt["state"])
        # channels-last convolutions in blocks of NET_CHUNK scenes: 2x faster on one thread (measured 3.5 vs 7.8 ms
        # per scene at width 32), same values to float32 rounding
        self.net.eval().to(memory_format=torch.channels_last)
        self.meta = {"config": dataclasses.asdict(self.dcfg), "train_seconds": round(float(ckpt["train_seconds"]), 1),
                     "parameters": sum(p.numel() for p in self.net.parameters()), "thresholds": ckpt["thresholds"],
                     "lm_iters": self.lm_iters}

    @torch.no_grad()
    def peaks(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded positions (B, K_MAX, 3) = (phi, theta, ln r) and K (B,) of measurements y (B, L, M)."""
        img = log_map(self.bmap.image(y)).to(memory_format=torch.channels_last)
        out = torch.cat([self.net(img[i:i + NET_CHUNK]) for i in range(0, img.shape[0], NET_CHUNK)])
        x, _, k = decode(out, self.threshold, self.cfg.scene.k_max, self.cfg.scene, self.dcfg.grid_step_deg)
        return x, k

    def refine(self, x0: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``lm_iters`` LM iterations of the ML cost on the first k[b] sources of every scene."""
        x = x0.clone()
        lo, hi = _box(self.cfg.scene)
        x = torch.maximum(torch.minimum(x, hi), lo)
        y = y.to(torch.complex128)
        for kk in range(1, self.cfg.scene.k_max + 1):
            sel = k == kk
            if sel.any() and self.lm_iters > 0:
                x[sel, :kk] = levenberg_marquardt(x[sel, :kk], self.bmap.phis, y[sel], self.system, lo, hi,
                                                  self.lm_iters)
        return x

    def __call__(self, data: dict) -> dict[str, tuple[Estimates, torch.Tensor, float]]:
        k_max = self.cfg.scene.k_max
        with single_threaded():
            t0 = time.perf_counter()
            x0, k = self.peaks(data["y"])
            t_net = time.perf_counter() - t0
            x = self.refine(x0, k, data["y"])
            total = time.perf_counter() - t0
        return {DETECTOR_PEAKS: (peak_estimates(x0, k, k_max), k, t_net),
                DETECTOR_REFINED: (peak_estimates(x, k, k_max), k, total)}


def load_detector(path: str | Path, cfg: RunConfig, lm_iters: int | None = None) -> tuple[LearnedDetector, str]:
    """The pipeline of a detector checkpoint on the config's system, and a tag (file hash) for the cache."""
    raw = Path(path).read_bytes()
    ckpt = torch.load(path, weights_only=False)
    if ckpt.get("format") != DETECTOR_FORMAT or "thresholds" not in ckpt:
        raise DetectorError(f"{path}: not a learned-detector checkpoint (format {ckpt.get('format')}, expected "
                            f"{DETECTOR_FORMAT}); train one with `python -m ris_model traindet`")
    tag = hashlib.sha256(raw).hexdigest()[:12] + ("" if lm_iters is None else f"_lm{lm_iters}")
    return LearnedDetector(ckpt, cfg, make_system(cfg), lm_iters), tag


__all__ = ["DETECTOR_PEAKS", "DETECTOR_REFINED", "DetectorError", "LearnedDetector", "load_detector"]
