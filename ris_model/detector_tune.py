"""Decision parameters of the learned pipeline (``detector_infer``), tuned per L on the TRAINING channels.

For every L of the detector: validation-split scenes of each training system (``n_val`` over the seeds; a
quarter as many at L = 64, which costs 4x), nominal SNR uniform in ``snr_db``. The pipeline runs once per
heat threshold up to its detect-subtract step; the second threshold and tau (a grid times L / 16: a spurious
source's statistic is about L) are then chosen on those fits, and the triple with the best pooled F1 (``benchmark.pooled_counts``: Hungarian, 5 deg gate)
is kept. The benchmark's channel (seed 0) and its scenes are never used.
"""

from __future__ import annotations

import logging

import numpy as np

from ris_model.benchmark import pooled_counts
from ris_model.config import RunConfig
from ris_model.detector import DetectorConfig, HeatNet, peak_estimates
from ris_model.detector_data import CHUNK, scenes
from ris_model.detector_infer import LearnedDetector, PipelineParams

logger = logging.getLogger(__name__)

HEAT_GRID = (0.2, 0.3, 0.4)
SECOND_GRID = (0.3, 0.5, 0.7)
TAU_GRID = (20.0, 30.0, 40.0, 50.0, 65.0, 80.0, 100.0, 130.0)  # times L / 16: a spurious source's statistic is ~ L


def _f1(counts: np.ndarray) -> float:
    return float(2 * counts[0] / max(2 * counts[0] + counts[1] + counts[2], 1))


def tune_pipeline(net: HeatNet, dcfg: DetectorConfig, cfg: RunConfig, systems: dict) -> dict[str, dict]:
    """{str(L): {heat, second, tau, val_f1, val_scenes}} (see the module docstring)."""
    k_max = cfg.scene.k_max
    out = {}
    for L in dcfg.snapshots:
        n = max(dcfg.n_val // len(dcfg.train_seeds), 1) // (4 if L > 16 else 1)
        sets = []
        for (seed, ll), (c, system, _) in systems.items():
            if ll != L:
                continue
            det = LearnedDetector(net, dcfg, PipelineParams(HEAT_GRID[0], None, None), c, system, warm=False)
            for start in range(0, n, CHUNK):
                sets.append((det, scenes(c, system, det.bmap, "val", list(range(start, min(start + CHUNK, n))), dcfg)["data"]))
        best = (-1.0, None)
        for heat in HEAT_GRID:
            first = []
            for det, d in sets:
                x0, k0, _ = det.peaks(d["y"], threshold=heat)
                x = det.refine(x0, k0, d["y"])
                first.append((x, k0, det.residual_peaks(x, k0, d["y"])))
            for second in SECOND_GRID:
                for tau in (t * L / 16 for t in TAU_GRID):
                    counts = np.zeros(3)
                    for (det, d), (x, k0, found) in zip(sets, first):
                        xe, ke = det.extend(x, k0, d["y"], found, second, tau)
                        xp, kp = det.prune(xe, ke, d["y"], tau)
                        counts += pooled_counts(peak_estimates(xp, kp, k_max), d)
                    best = max(best, (_f1(counts), (heat, second, tau)), key=lambda t: t[0])
        heat, second, tau = best[1]
        out[str(L)] = {"heat": heat, "second": second, "tau": tau, "val_f1": round(best[0], 4),
                       "val_scenes": sum(len(d["k"]) for _, d in sets)}
        logger.info("detector pipeline L=%d: heat %.2f, second %.2f, tau %.0f (validation F1 %.3f over %d scenes)",
                    L, heat, second, tau, best[0], out[str(L)]["val_scenes"])
    return out


__all__ = ["HEAT_GRID", "SECOND_GRID", "TAU_GRID", "tune_pipeline"]
