"""The learned pipeline at inference: beamformer map -> detector peaks -> short ML refinement -> pruning ->
re-search of the weakest source -> detect-subtract steps -> pruning by the ML residual.

For the benchmark's system (any channel, any L; the detector was trained on other channels):
  1. the whitened Bartlett map of the scene (``beam_map``) and one pass of the detector (``detector``): the
     peaks above ``heat`` are the candidate sources, at the cell plus the regressed offsets and ln r;
  2. refinement (``refine``, ``detector_refine.FastRefiner``): ``whiten_iters`` Levenberg-Marquardt iterations
     of the whitened cost (the ML estimator's search cost, fewer false minima), then ``lm_iters`` of the
     concentrated ML cost, on all candidates of a scene jointly;
  3. pruning (``prune``): a source whose removal raises the ML residual by less than ``tau`` per residual
     degree of freedom is dropped (the statistic of ``model_order.residual_drop``, read backwards; all of a
     scene's statistics from one fit, ``FastRefiner.removal_rise``); then (``relocate_weakest``, on scenes whose
     weakest statistic is below ``relocate``) the weakest source is searched again on the whitened map of the
     residual with the other sources projected out (one alternating-projection step) and moved when the ML
     residual drops there;
  4. detect-subtract (``extend``): a candidate in the residual after those sources (``second`` None: the cell
     of the largest whitened Bartlett map value of the residual, the ML estimator's greedy step; else the
     detector's best peak on the residual's map when above ``second``) is added when, at its position, it
     lowers the ML residual by more than ``tau`` per degree of freedom, and that scene refined again; a scene
     may hold K_MAX + 1 sources here, so that a source the peaks misplaced can be replaced;
  5. pruning again, down to at most K_MAX sources; steps 4-5 are repeated (``detect_steps`` in all) on the
     scenes the previous step extended (on the others the step would find the same rejected candidate).
``heat``, ``second`` and ``tau`` are tuned per L on validation scenes of the TRAINING channels
(``detector_tune``) and stored in the checkpoint with the iteration counts. Two methods are reported: the
peaks of step 1 alone, and the whole pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import NamedTuple

import torch

from ris_model.beam_map import BeamMap
from ris_model.config import RunConfig
from ris_model.detector import DETECTOR_FORMAT, DetectorConfig, HeatNet, decode, log_map, peak_estimates
from ris_model.detector_refine import FastRefiner, residual_energy
from ris_model.ml_estimator import _box
from ris_model.music import Estimates, single_threaded
from ris_model.simulate import System, make_system

NET_CHUNK = 25  # scenes per forward pass at inference
DETECT_STEPS = 2  # detect-subtract steps (docs/evaluation.md: validation scenes of the training channels)
RELOCATE_GATE = 400.0  # ``relocate_weakest`` on scenes whose weakest drop statistic is below this (validation)
PIPELINE_VERSION = 5  # part of the benchmark's cache key of the learned rows: bump when the pipeline's output changes
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
    whiten_iters: int = 0  # LM iterations on the whitened cost before the ``lm_iters`` of the ML cost
    detect_steps: int = DETECT_STEPS  # detect-subtract steps (each on the scenes the previous one extended)
    relocate: float | None = RELOCATE_GATE  # gate of ``relocate_weakest`` (None: the step is off)


class Tested(NamedTuple):
    """What pruning has established about each scene's current sources (B scenes): ``pruned`` (B,) bool, tested
    by pruning as they are (it keeps them); ``known`` (B,) bool, their residual P_perp(B_l) y_l is
    ``residual`` (B, L, M) (where pruning tested them with k >= 2)."""

    pruned: torch.Tensor
    known: torch.Tensor
    residual: torch.Tensor


def detector_config(raw: dict) -> DetectorConfig:
    return DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


class LearnedDetector:
    """Inference on a ``simulate`` dict of the system's scenes: {method: (Estimates, K used, seconds)}."""

    def __init__(self, net: HeatNet, dcfg: DetectorConfig, params: PipelineParams, cfg: RunConfig, system: System,
                 lm_iters: int | None = None, warm: bool = True):
        self.dcfg, self.params, self.cfg, self.system = dcfg, params, cfg, system
        self.lm_iters = dcfg.lm_iters if lm_iters is None else lm_iters
        self.bmap = BeamMap(system, cfg.scene, dcfg.grid_step_deg, dcfg.n_range)
        self.refiner = FastRefiner(system, self.bmap.phis, *_box(cfg.scene))
        self.refiner_w = FastRefiner(system, self.bmap.w @ self.bmap.phis, *_box(cfg.scene))
        # channels-last convolutions in blocks of NET_CHUNK scenes: 2x faster on one thread (measured 3.5 vs 7.8 ms
        # per scene at width 32), same values to float32 rounding
        self.net = net.eval().to(memory_format=torch.channels_last)
        if warm:  # the first forward-mode pass and GEMM of a process carry a one-off set-up cost (measured ~20 ms
            ones = torch.ones(1, system.codes.shape[0], system.channel.shape[0], dtype=torch.complex128)
            self.refine(self.peaks(ones)[0][:, :1], torch.ones(1, dtype=torch.int64), ones)  # per scene on 100)

    @torch.inference_mode()
    def peaks(self, y: torch.Tensor, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded positions (B, K_MAX, 3) = (phi, theta, ln r), K (B,) and peak scores (B, K_MAX) of y (B, L, M)."""
        img = log_map(self.bmap.image(y, torch.channels_last))  # elementwise: stays channels-last
        out = torch.cat([self.net(img[i:i + NET_CHUNK]) for i in range(0, img.shape[0], NET_CHUNK)])
        thr = self.params.heat if threshold is None else threshold
        x, score, k = decode(out, thr, self.cfg.scene.k_max, self.cfg.scene, self.dcfg.grid_step_deg)
        return x, k, score

    def refine(self, x0: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LM on the first k[b] sources of every scene, all scenes in one batch: ``whiten_iters`` iterations of the
        whitened cost sum_l ||P_perp(W_l B_l) W_l y_l||^2 (the ML search's cost: fewer false minima,
        docs/evaluation.md), then ``lm_iters`` of the ML cost."""
        x = torch.maximum(torch.minimum(x0, self.refiner.hi), self.refiner.lo)
        if len(k) == 0:
            return x
        n = int(k.max())
        y = y.to(torch.complex128)
        xs = x[:, :n]
        if self.params.whiten_iters > 0:
            xs = self.refiner_w.refine(xs, self.bmap.whiten(y), self.params.whiten_iters, k)
        x[:, :n] = self.refiner.refine(xs, y, self.lm_iters, k)
        return x

    def residual_peaks(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor,
                       known: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A candidate in the residual P_perp(B_l) y_l after the first k[b] sources of x: (B, 3) with a score
        (B,), and the residual energy e_k (B,). ``second`` None: the cell (phi, theta, ln r) of the largest
        whitened Bartlett map value of the residual (the ML estimator's greedy step, on the detector's grid),
        score +inf; else the detector's best peak on the residual's map and its score. ``known``: (mask (B,),
        residuals (B, L, M)), the residuals of these sources where mask holds (computed here for the others)."""
        y = y.to(torch.complex128)
        if known is None:
            res = self.refiner.residual(x[:, :int(k.max())], y, k)
        else:
            res = known[1].clone()
            todo = (~known[0]).nonzero()[:, 0]
            if len(todo):
                res[todo] = self.refiner.residual(x[todo, :int(k[todo].max())], y[todo], k[todo])
        energy = res.real.square().sum((-2, -1)) + res.imag.square().sum((-2, -1))
        if self.params.second is None:
            cell = self.bmap.flat(res).argmax(-1)
            return self.bmap.dictionary.points[cell], torch.full_like(energy, float("inf")), energy
        cand, _, score = self.peaks(res)
        return cand[:, 0], score[:, 0], energy

    def extend(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor, found: tuple[torch.Tensor, ...],
               threshold: float, tau: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detect-subtract: the residual peak ``found`` (``residual_peaks``) is added where its score exceeds
        ``threshold`` (and k < the slots of x) and, at its detected position, it lowers the ML residual by more
        than ``tau`` per degree of freedom (the statistic of ``prune``); only those scenes are refined again.
        Returns x, k and the indices of the scenes that gained the candidate."""
        cand, score, e_old = found
        slots = x.shape[1]
        L, m = y.shape[-2:]
        y = y.to(torch.complex128)
        x, k = x.clone(), k.clone()
        idx = ((score > threshold) & (k < slots)).nonzero()[:, 0]
        x[idx, k[idx]] = cand[idx]
        if tau is not None and len(idx):
            kn = k[idx] + 1
            e_new = self.refiner.energy(x[idx, :int(kn.max())], y[idx], kn)
            idx = idx[(e_old[idx] - e_new) / (e_new / (L * (m - kn))) > tau]
        k[idx] += 1
        x[idx] = self.refine(x[idx], k[idx], y[idx])
        return x, k, idx

    def relocate_weakest(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor, gate: float,
                         stats: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One alternating-projection step for the weakest source of each scene with k >= 2 sources (the one whose
        removal raises the ML residual least), on the scenes where that drop statistic is below ``gate``: the
        cell of the largest whitened Bartlett map value of the residual with the OTHER sources projected out
        replaces it when the ML residual drops there, and that scene is refined again. It moves a source the
        short local refinement left in a false minimum (a miss and a false alarm at once). ``stats``: the
        ``drop_statistics`` of every scene's current sources where k >= 2 (those of ``prune_with_statistics``;
        None: computed here). Returns x and the indices of the scenes moved."""
        y = y.to(torch.complex128)
        x = x.clone()
        sel = (k >= 2).nonzero()[:, 0]
        if len(sel) == 0:
            return x, sel
        ks = k[sel]
        n = int(ks.max())
        xb, yb = x[sel, :n], y[sel]
        if stats is None:
            low, j, e_cur, _ = self.drop_statistics(xb, ks, yb)
        else:
            low, j, e_cur = stats[0][sel], stats[1][sel], stats[2][sel]
        hit = low < gate
        sel, xb, yb, ks, e_cur, j = sel[hit], xb[hit], yb[hit], ks[hit], e_cur[hit], j[hit]
        if len(sel) == 0:
            return x, sel
        rows = torch.arange(len(sel))
        order = torch.arange(n).expand(len(sel), n)
        others = xb[rows[:, None], order[order != j[:, None]].reshape(len(sel), n - 1)]
        res = self.refiner.residual(others, yb, ks - 1)
        trial = xb.clone()
        trial[rows, j] = self.bmap.dictionary.points[self.bmap.flat(res).argmax(-1)]
        ok = self.refiner.energy(trial, yb, ks) < e_cur
        b = sel[ok]
        if len(b):
            x[b, :n] = trial[ok]
            x[b] = self.refine(x[b], k[b], y[b])
        return x, b

    def drop_statistics(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The smallest drop statistic (e_{-j} - e) / (e / (L (M - k))) over the first k[b] sources of x (B, K, 3)
        (B,), the source j (B,) it belongs to, the residual energy e (B,) and the residual (B, L, M)."""
        L, m = y.shape[-2:]
        r, rise = self.refiner.residual_and_rise(x, y, k)
        e = residual_energy(r)
        low, j = (rise / (e / (L * (m - k)))[:, None]).min(-1)
        return low, j, e, r

    def prune(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor, tau: float,
              k_keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop, one at a time, the source whose removal raises the ML residual least while that rise is below
        ``tau`` per residual degree of freedom, or while the scene holds more than ``k_keep`` sources (the
        dropped source goes to the last slot). A spurious source explains about one noise degree of freedom per
        snapshot (plus what its position fits); a real one far more."""
        return self.prune_with_statistics(x, k, y, tau, k_keep)[:2]

    def prune_with_statistics(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor, tau: float,
                              k_keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """``prune``, and the ``drop_statistics`` (low, j, e (B,), residual (B, L, M)) of the sources each scene
        keeps, from its last test (every scene left with k >= 2 was tested last with the sources it keeps; low is
        +inf where k < 2, and the residual is not known there)."""
        slots = x.shape[1]
        k_keep = slots if k_keep is None else k_keep
        y = y.to(torch.complex128)
        x, k = x.clone(), k.clone()
        low_all = torch.full(k.shape, float("inf"), dtype=torch.float64)
        j_all, e_all = torch.zeros_like(k), torch.zeros(k.shape, dtype=torch.float64)
        r_all = torch.zeros(y.shape, dtype=torch.complex128)
        todo = (k >= 2).nonzero()[:, 0]
        while len(todo):  # a scene that dropped a source is tested again with one fewer
            kt = k[todo]
            low, j, e, r = self.drop_statistics(x[todo, :int(kt.max())], kt, y[todo])
            low_all[todo], j_all[todo], e_all[todo], r_all[todo] = low, j, e, r
            drop = (low < tau) | (kt > k_keep)
            todo, j = todo[drop], j[drop]
            order = torch.arange(slots).expand(len(todo), slots)
            order = torch.where(order == j[:, None], slots, order).argsort(-1)  # source j to the last slot
            x[todo] = x[todo[:, None], order]
            k[todo] -= 1
            low_all[todo] = float("inf")
            todo = todo[k[todo] >= 2]
        return x, k, (low_all, j_all, e_all, r_all)

    @torch.inference_mode()
    def run(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Peaks (x0, k0), the whole pipeline's (x, k), and the seconds of the peaks alone."""
        t0 = time.perf_counter()
        x0, k0, _ = self.peaks(y)
        t_net = time.perf_counter() - t0
        x, k, tested = self.refined_peaks(x0, k0, y)
        x, k = self.detect_subtract(x, k, y, self.params.second, self.params.tau, tested)
        return x0, k0, x, k, t_net

    def refined_peaks(self, x0: torch.Tensor, k0: torch.Tensor, y: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, Tested]:
        """Steps 2-3: LM on the peaks, then pruning (room for the detect-subtract step); x gets one spare slot.
        Also what pruning established about the sources returned (``Tested``: a scene the re-search moved is
        no longer as pruning tested it)."""
        x, k = self.refine(x0, k0, y), k0
        tested = Tested(torch.zeros(k.shape, dtype=torch.bool), torch.zeros(k.shape, dtype=torch.bool),
                        torch.zeros(y.shape, dtype=torch.complex128))
        stats = None
        if self.params.tau is not None:
            x, k, stats = self.prune_with_statistics(x, k, y, self.params.tau)
            tested = Tested(torch.ones(k.shape, dtype=torch.bool), stats[0].isfinite(), stats[3])
        if self.params.relocate is not None:
            x, moved = self.relocate_weakest(x, k, y, self.params.relocate, stats)
            tested.pruned[moved] = False
            tested.known[moved] = False
        return torch.cat([x, torch.zeros_like(x[:, :1])], 1), k, tested

    def detect_subtract(self, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor, second: float | None,
                        tau: float | None, tested: Tested | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 4-5 on the output of ``refined_peaks``: ``detect_steps`` detect-subtract steps (each up to
        K_MAX + 1 sources, so that a source the peaks misplaced can be replaced, then pruning to at most K_MAX),
        the second and later ones on the scenes the step before extended; (B, K_MAX, 3). ``tested``: what
        pruning by ``tau`` established about the scenes of at most K_MAX sources as they are (a step that does
        not extend a scene pruning tested leaves it out of its pruning; known residuals are not recomputed);
        None: nothing."""
        k_max = self.cfg.scene.k_max
        if tau is not None:
            x, k = x.clone(), k.clone()
            todo = torch.arange(len(k))
            if tested is None:
                fresh = torch.ones(k.shape, dtype=torch.bool)
                known, res = torch.zeros(k.shape, dtype=torch.bool), torch.zeros(y.shape, dtype=torch.complex128)
            else:
                fresh, known, res = ~tested.pruned, tested.known.clone(), tested.residual.clone()
            for _ in range(self.params.detect_steps):
                xs, ks, ys = x[todo], k[todo], y[todo]
                found = self.residual_peaks(xs, ks, ys, (known[todo], res[todo]))
                xs, ks, gained = self.extend(xs, ks, ys, found, float("-inf") if second is None else second, tau)
                x[todo], k[todo] = xs, ks
                # a scene pruning tested that did not gain its candidate is left as it was: pruning would keep it,
                # and the next step would find the same candidate and reject it again; only the others go on
                fresh[todo[gained]] = True
                test = fresh.nonzero()[:, 0]
                x[test], k[test], stats = self.prune_with_statistics(x[test], k[test], y[test], tau, k_keep=k_max)
                known[test], res[test] = stats[0].isfinite(), stats[3]
                fresh[:] = False
                todo = todo[gained]
                if len(todo) == 0:
                    break
        elif bool((k > k_max).any()):
            x, k = self.prune(x, k, y, float("-inf"), k_keep=k_max)
        return x[:, :k_max], k

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
    det = LearnedDetector(net, dcfg, PipelineParams(p["heat"], p["second"], p["tau"], p.get("whiten_iters", 0),
                                                    p.get("detect_steps", DETECT_STEPS),
                                                    p.get("relocate", RELOCATE_GATE)),
                          cfg, system, p.get("lm_iters") if lm_iters is None else lm_iters)
    det.meta = {"config": dataclasses.asdict(dcfg), "train_seconds": round(float(ckpt["train_seconds"]), 1),
                "parameters": sum(q.numel() for q in net.parameters()), "pipeline": ckpt["pipeline"],
                "lm_iters": det.lm_iters, "detect_steps": det.params.detect_steps, "relocate": det.params.relocate,
                "pipeline_version": PIPELINE_VERSION}
    tag = (hashlib.sha256(raw).hexdigest()[:12] + f"_p{PIPELINE_VERSION}"
           + ("" if lm_iters is None else f"_lm{lm_iters}"))
    return det, tag


__all__ = ["DETECT_STEPS", "PIPELINE_VERSION", "DETECTOR_PEAKS", "DETECTOR_REFINED", "DetectorError", "PipelineParams", "Tested", "LearnedDetector",
           "load_detector", "detector_config"]
