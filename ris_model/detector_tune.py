"""Decision parameters of the learned pipeline (``detector_infer``), tuned per L on the TRAINING channels.

For every L of the detector: validation-split scenes of each training system (``n_val`` over the seeds; a
quarter as many at L = 64, which costs 4x), nominal SNR uniform in ``snr_db``. The pipeline runs once per
heat threshold up to its refinement (``WHITEN_ITERS`` whitened then ``LM_ITERS`` ML iterations: fixed, not
tuned), then per tau (a grid times L / 16: a spurious source's statistic is about L) through pruning, the
``DETECT_STEPS`` detect-subtract steps on the residual's map (``second`` None: the map's largest cell, no
second network pass) and the final pruning; the pair with the best pooled F1 (``benchmark.pooled_counts``: Hungarian, 5 deg gate)
is kept. The benchmark's channel (dataset seed 0) and its scenes are never used.

    python -m ris_model tunedet --checkpoint reports/evaluation/detector.pt   (re-tunes a trained detector)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ris_model.benchmark import pooled_counts
from ris_model.config import RunConfig
from ris_model.detector import DetectorConfig, HeatNet, peak_estimates
from ris_model.detector_data import CHUNK, scenes
from ris_model.detector_infer import DETECT_STEPS, LearnedDetector, PipelineParams

logger = logging.getLogger(__name__)

HEAT_GRID = (0.1, 0.15, 0.2, 0.3)
TAU_GRID = (30.0, 35.0, 40.0, 45.0, 50.0, 57.5, 65.0)  # times L / 16: a spurious source's statistic is ~ L
WHITEN_ITERS = 2  # LM iterations on the whitened cost (docs/evaluation.md: fewer misplaced sources at 10 dB)
LM_ITERS = 1  # then LM iterations on the ML cost


def _f1(counts: np.ndarray) -> float:
    return float(2 * counts[0] / max(2 * counts[0] + counts[1] + counts[2], 1))


@torch.inference_mode()
def tune_pipeline(net: HeatNet, dcfg: DetectorConfig, cfg: RunConfig, systems: dict) -> dict[str, dict]:
    """{str(L): {heat, second (None), tau, whiten_iters, lm_iters, val_f1, val_scenes}} (see the module docstring)."""
    k_max = cfg.scene.k_max
    out = {}
    for L in dcfg.snapshots:
        n = max(dcfg.n_val // len(dcfg.train_seeds), 1) // (4 if L > 16 else 1)
        sets = []
        for (seed, ll), (c, system, _) in systems.items():
            if ll != L:
                continue
            det = LearnedDetector(net, dcfg, PipelineParams(HEAT_GRID[0], None, None, WHITEN_ITERS), c, system,
                                  lm_iters=LM_ITERS, warm=False)
            for start in range(0, n, CHUNK):
                sets.append((det, scenes(c, system, det.bmap, "val", list(range(start, min(start + CHUNK, n))), dcfg)["data"]))
        best = (-1.0, None)
        for heat in HEAT_GRID:
            first = []
            for det, d in sets:
                x0, k0, _ = det.peaks(d["y"], threshold=heat)
                first.append((det.refine(x0, k0, d["y"]), k0))
            for tau in (t * L / 16 for t in TAU_GRID):
                counts = np.zeros(3)
                for (det, d), (x, k0) in zip(sets, first):
                    det.params = PipelineParams(heat, None, tau, WHITEN_ITERS)
                    x1, k1 = det.prune(x, k0, d["y"], tau)
                    x1 = torch.cat([x1, torch.zeros_like(x1[:, :1])], 1)
                    xp, kp = det.detect_subtract(x1, k1, d["y"], None, tau)
                    counts += pooled_counts(peak_estimates(xp, kp, k_max), d)
                best = max(best, (_f1(counts), (heat, None, tau)), key=lambda t: t[0])
        heat, second, tau = best[1]
        out[str(L)] = {"heat": heat, "second": second, "tau": tau, "whiten_iters": WHITEN_ITERS, "lm_iters": LM_ITERS,
                       "detect_steps": DETECT_STEPS,
                       "val_f1": round(best[0], 4), "val_scenes": sum(len(d["k"]) for _, d in sets)}
        logger.info("detector pipeline L=%d: heat %.2f, tau %.0f (validation F1 %.3f over %d scenes)",
                    L, heat, tau, best[0], out[str(L)]["val_scenes"])
    return out


def retune_checkpoint(path: Path, cfg: RunConfig) -> dict[str, dict]:
    """Re-tune the pipeline of a trained detector checkpoint in place (weights unchanged)."""
    from ris_model.detector_data import training_systems
    from ris_model.detector_infer import detector_config
    from ris_model.music import single_threaded

    ckpt = torch.load(path, weights_only=False)
    dcfg = detector_config(ckpt["dcfg"])
    net = HeatNet(dcfg.n_range, dcfg.width)
    net.load_state_dict(ckpt["state"])
    with single_threaded():
        ckpt["pipeline"] = tune_pipeline(net.eval(), dcfg, cfg, training_systems(cfg, dcfg))
    torch.save(ckpt, path)
    return ckpt["pipeline"]


__all__ = ["HEAT_GRID", "TAU_GRID", "WHITEN_ITERS", "LM_ITERS", "tune_pipeline", "retune_checkpoint"]
