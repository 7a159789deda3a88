"""The learned pipeline at inference: beamformer map -> detector peaks -> short ML refinement -> one
detect-subtract step -> pruning by the ML residual.

For the benchmark's system (any channel, any L; the detector was trained on other channels):
  1. the whitened Bartlett map of the scene (``beam_map``) and one pass of the detector (``detector``): the
     peaks above ``heat`` are the first sources, at the cell plus the regressed offsets and ln r;
  2. ``lm_iters`` Levenberg-Marquardt iterations of the concentrated ML cost (the function the ML estimator
     ends with, ``ml_estimator.levenberg_marquardt``) on all of them jointly;
  3. detect-subtract (``extend``): the detector on the map of the residual after those sources; its best peak,
     when above ``second`` and when it lowers the ML residual by more than ``tau`` per degree of freedom (at its
     detected position), is added and that scene refined again (sources the first map merged);
  4. pruning (``prune``): a source whose removal raises the ML residual by less than ``tau`` per residual
     degree of freedom is dropped (the statistic of ``model_order.residual_drop``, read backwards).
``heat``, ``second`` and ``tau`` are tuned per L on validation scenes of the TRAINING channels
(``detector_tune``) and stored in the checkpoint. Two methods are reported: the peaks of step 1 alone, and
the whole pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import torch

from ris_model.beam_map import BeamMap
from ris_model.config import RunConfig
from ris_model.detector import DETECTOR_FORMAT, DetectorConfig, HeatNet, decode, log_map, peak_estimates
from ris_model.ml_estimator import _apply, _box, _project_out, energy, levenberg_marquardt
from ris_model.music import Estimates, single_threaded
from ris_model.simulate import System, make_system

NET_CHUNK = 25  # scenes per forward pass at inference
DETECTOR_PEAKS = "learned detector peaks (no refinement)"
DETECTOR_REFINED = "learned detector + ML refinement"


class DetectorError(ValueError):
    """A checkpoint that is not a detector, or one without parameters for the system's L."""


@dataclasses.dataclass(frozen=True)
class PipelineParams:
    """Decision parameters of the pipeline for one L (see the module docstring); ``second``/``tau`` None: off."""

    heat: float
    second: float | None
    tau: float | None


def detector_config(raw: dict) -> DetectorConfig:
    return DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


class LearnedDetector:
    """Inference on a ``simulate`` dict of the system's scenes: {method: (Estimates, K used, seconds)}."""

    def __init__(self, net: HeatNet, dcfg: DetectorConfig, params: PipelineParams, cfg: RunConfig, system: System,
                 lm_iters: int | None = None, warm: bool = True):
        self.dcfg, self.params, self.cfg, self.system = dcfg, params, cfg, system
        self.lm_iters = dcfg.lm_iters if lm_iters is None else lm_iters
        self.bmap = BeamMap(system, cfg.scene, dcfg.grid_step_deg, dcfg.n_range)
        # channels-last convolutions in blocks of NET_CHUNK scenes: 2x faster on one thread (measured 3.5 vs 7.8 ms
        # per scene at width 32), same values to float32 rounding
        self.net = net.eval().to(memory_format=torch.channels_last)
        if warm:  # the first forward-mode pass and GEMM of a process carry a one-off set-up cost (measured ~20 ms
            ones = torch.ones(1, system.codes.shape[0], system.channel.shape[0], dtype=torch.complex128)
            self.refine(self.peaks(ones)[0][:, :1], torch.ones(1, dtype=torch.int64), ones)  # per scene on 100)

    @torch.no_grad()
    def peaks(self, y: torch.Tensor, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded positions (B, K_MAX, 3) = (phi, theta, ln r), K (B,) and peak scores (B, K_MAX) of y (B, L, M)."""
        img = log_map(self.bmap.image(y)).to(memory_format=torch.channels_last)
        out = torch.cat([self.net(img[i:i + NET_CHUNK]) for i in range(0, img.shape[0], NET_CHUNK)])
        thr = self.params.heat if threshold is None else threshold
        x, score, k = decode(out, thr, self.cfg.scene.k_max, self.cfg.scene, self.dcfg.grid_step_deg)
        return x, k, score

    def refine(self, x0: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``lm_iters`` LM iterations of the ML cost on the first k[b] sources of every scene."""
        lo, hi = _box(self.cfg.scene)
        x = torch.maximum(torch.minimum(x0, hi), lo)
        y = y.to(torch.complex128)
        for kk in range(1, self.cfg.scene.k_max + 1):
            sel = k == kk
            if sel.any() and self.lm_iters > 0:
                x[sel, :kk] = levenberg_marquardt(x[sel, :kk], self.bmap.phis, y[sel], self.system, lo, hi,
                                                  self.lm_iters)
        return x

    def residual_peaks(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The detector on the map of the residual P_perp(B_l) y_l after the first k[b] sources of x: its best
        peak (B, 3) and score (B,), and the residual energy e_k (B,)."""
        y = y.to(torch.complex128)
        res = y.clone()
        for kk in range(1, self.cfg.scene.k_max + 1):
            sel = k == kk
            if sel.any():
                xs = x[sel, :kk]
                cols = _apply(self.bmap.phis, self.system.steer(xs[..., 0], xs[..., 1], xs[..., 2].exp()))
                res[sel] = _project_out(cols, y[sel])
        cand, _, score = self.peaks(res)
        return cand[:, 0], score[:, 0], res.abs().square().sum((-2, -1))

    def extend(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor, found: tuple[torch.Tensor, ...],
               threshold: float, tau: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Detect-subtract: the residual peak ``found`` (``residual_peaks``) is added where its score exceeds
        ``threshold`` (and k < K_MAX) and, at its detected position, it lowers the ML residual by more than ``tau``
        per degree of freedom (the statistic of ``prune``); only those scenes are refined again."""
        cand, score, e_old = found
        k_max = self.cfg.scene.k_max
        L, m = y.shape[-2:]
        y = y.to(torch.complex128)
        x, k = x.clone(), k.clone()
        idx = ((score > threshold) & (k < k_max)).nonzero()[:, 0]
        x[idx, k[idx]] = cand[idx]
        if tau is not None:
            keep = torch.zeros(len(idx), dtype=torch.bool)
            for kk in range(2, k_max + 1):
                sub = (k[idx] + 1 == kk).nonzero()[:, 0]
                if len(sub):
                    b = idx[sub]
                    e_new = energy(x[b, :kk], self.bmap.phis, y[b], self.system)
                    keep[sub] = (e_old[b] - e_new) / (e_new / (L * (m - kk))) > tau
            idx = idx[keep]
        k[idx] += 1
        x[idx] = self.refine(x[idx], k[idx], y[idx])
        return x, k

    def drop_statistics(self, x: torch.Tensor, kk: int, y: torch.Tensor) -> torch.Tensor:
        """(e_{-j} - e) / (e / (L (M - kk))) for each of the kk sources of x (B, kk, 3): (B, kk)."""
        L, m = y.shape[-2:]
        e = energy(x, self.bmap.phis, y, self.system)
        rise = torch.stack([energy(x[:, [i for i in range(kk) if i != j]], self.bmap.phis, y, self.system)
                            for j in range(kk)], -1) - e[:, None]
        return rise / (e / (L * (m - kk)))[:, None]

    def prune(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop, one at a time, the source whose removal raises the ML residual least while that rise is below
        ``tau`` per residual degree of freedom. A spurious source explains about one noise degree of freedom
        per snapshot (plus what its position fits); a real one far more."""
        k_max = self.cfg.scene.k_max
        y = y.to(torch.complex128)
        x, k = x.clone(), k.clone()
        for kk in range(k_max, 1, -1):  # a scene dropping from kk to kk - 1 is tested again at kk - 1
            sel = (k == kk).nonzero()[:, 0]
            if len(sel) == 0:
                continue
            low, j = self.drop_statistics(x[sel, :kk], kk, y[sel]).min(-1)
            for b, jj in zip(sel[low < tau].tolist(), j[low < tau].tolist()):
                x[b] = x[b, [i for i in range(k_max) if i != jj] + [jj]]
                k[b] -= 1
        return x, k

    def run(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Peaks (x0, k0), the whole pipeline's (x, k), and the seconds of the peaks alone."""
        t0 = time.perf_counter()
        x0, k0, _ = self.peaks(y)
        t_net = time.perf_counter() - t0
        x, k = self.refine(x0, k0, y), k0
        if self.params.second is not None:
            x, k = self.extend(x, k, y, self.residual_peaks(x, k, y), self.params.second, self.params.tau)
        if self.params.tau is not None:
            x, k = self.prune(x, k, y, self.params.tau)
        return x0, k0, x, k, t_net

    def __call__(self, data: dict) -> dict[str, tuple[Estimates, torch.Tensor, float]]:
        k_max = self.cfg.scene.k_max
        with single_threaded():
            t0 = time.perf_counter()
            x0, k0, x, k, t_net = self.run(data["y"])
            total = time.perf_counter() - t0
        return {DETECTOR_PEAKS: (peak_estimates(x0, k0, k_max), k0, t_net),
                DETECTOR_REFINED: (peak_estimates(x, k, k_max), k, total)}


def load_detector(path: str | Path, cfg: RunConfig, lm_iters: int | None = None) -> tuple[LearnedDetector, str]:
    """The pipeline of a detector checkpoint on the config's system, and a tag (file hash) for the cache."""
    raw = Path(path).read_bytes()
    ckpt = torch.load(path, weights_only=False)
    if ckpt.get("format") != DETECTOR_FORMAT:
        raise DetectorError(f"{path}: not a learned-detector checkpoint (format {ckpt.get('format')}, expected "
                            f"{DETECTOR_FORMAT}); train one with `python -m ris_model traindet`")
    system = make_system(cfg)
    L = system.codes.shape[0]
    if str(L) not in ckpt["pipeline"]:
        raise DetectorError(f"{path}: tuned for L in {sorted(ckpt['pipeline'])}, not for the config's L = {L}; "
                            f"retrain with DetectorConfig.snapshots including {L}")
    dcfg = detector_config(ckpt["dcfg"])
    net = HeatNet(dcfg.n_range, dcfg.width)
    net.load_state_dict(ckpt["state"])
    p = ckpt["pipeline"][str(L)]
    det = LearnedDetector(net, dcfg, PipelineParams(p["heat"], p["second"], p["tau"]), cfg, system, lm_iters)
    det.meta = {"config": dataclasses.asdict(dcfg), "train_seconds": round(float(ckpt["train_seconds"]), 1),
                "parameters": sum(q.numel() for q in net.parameters()), "pipeline": ckpt["pipeline"],
                "lm_iters": det.lm_iters}
    tag = hashlib.sha256(raw).hexdigest()[:12] + ("" if lm_iters is None else f"_lm{lm_iters}")
    return det, tag


__all__ = ["DETECTOR_PEAKS", "DETECTOR_REFINED", "DetectorError", "PipelineParams", "LearnedDetector",
           "load_detector", "detector_config"]
