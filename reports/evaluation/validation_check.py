"""Pooled F1 of the learned pipeline's variants on VALIDATION scenes of the TRAINING channels (dataset seeds 1-8,
never the benchmark's seed-0 channel or its test scenes), L = 16, at fixed nominal SNRs: the evidence behind the
pipeline choices of docs/evaluation.md (detect-subtract steps, tau, the gate of the weakest source's re-search:
``off`` or a drop-statistic gate, ``inf`` = every scene with k >= 2).

    PYTHONPATH=. python reports/evaluation/validation_check.py [--snr 10 20] [--n 100] [--steps 1 2]
                                                               [--tau 50] [--relocate off inf 100]
                                                               [--ml]

Scenes: validation-split indices OFFSET..OFFSET + n - 1 of each training system (the tuning of ``tunedet`` uses
0..49, at SNR uniform in 0-30 dB). ``--ml``: the ML estimator with the benchmark's threshold (tau 51.6) on the
same scenes, for reference (about 0.3-1 s per scene).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import numpy as np
import torch

from ris_model.benchmark import estimates_from_fits, ml_fits, pooled_counts
from ris_model.config import load_config
from ris_model.detector import peak_estimates
from ris_model.detector_data import system_config
from ris_model.detector_infer import LearnedDetector, load_detector
from ris_model.ml_estimator import MLConfig, MLEstimator
from ris_model.model_order import threshold_k
from ris_model.music import single_threaded
from ris_model.simulate import make_system, simulate

OFFSET = 5000
SEEDS = range(1, 9)
ML_TAU = 51.6267  # the benchmark's threshold (tables.md)


def _f1(c: np.ndarray) -> float:
    return float(2 * c[0] / max(2 * c[0] + c[1] + c[2], 1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--snr", type=float, nargs="+", default=[10.0, 20.0])
    p.add_argument("--n", type=int, default=100, help="scenes per training channel and SNR")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="detect-subtract steps to compare")
    p.add_argument("--tau", type=float, nargs="+", default=None, help="pruning thresholds (default: the checkpoint's)")
    p.add_argument("--relocate", nargs="+", default=None,
                   help="gates of the weakest source's re-search, 'off' for none (default: the pipeline's)")
    p.add_argument("--ml", action="store_true", help="also the ML estimator on the same scenes")
    p.add_argument("--checkpoint", default="reports/evaluation/detector.pt")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/default.toml", [])
    base, _ = load_detector(args.checkpoint, cfg)
    for snr in args.snr:
        sets = []
        for seed in SEEDS:
            c = system_config(cfg, seed, 16, (snr, snr))
            system = make_system(c)
            det = LearnedDetector(base.net, base.dcfg, base.params, c, system, base.lm_iters, warm=False)
            sets.append((det, simulate(c, system, "val", list(range(OFFSET, OFFSET + args.n)))))
        for steps in args.steps:
            for tau, gate in itertools.product(args.tau or [base.params.tau], args.relocate or [base.params.relocate]):
                gate = None if gate in (None, "off") else float(gate)
                counts, sec = np.zeros(3), 0.0
                for det, d in sets:
                    det.params = dataclasses.replace(base.params, detect_steps=steps, tau=tau, relocate=gate)
                    with single_threaded(), torch.inference_mode():
                        t0 = time.process_time()
                        _, _, x, k, _ = det.run(d["y"])
                        sec += time.process_time() - t0
                    counts += pooled_counts(peak_estimates(x, k, cfg.scene.k_max), d)
                print(f"{snr:g} dB, {len(sets) * args.n} scenes: learned, {steps} detect-subtract step(s), tau {tau:g}, re-search gate {gate}: "
                      f"F1 {_f1(counts):.4f} (TP {counts[0]:.0f}, FP {counts[1]:.0f}, FN {counts[2]:.0f}), "
                      f"{sec / (len(sets) * args.n) * 1e3:.2f} ms CPU per scene", flush=True)
        if args.ml:
            counts = np.zeros(3)
            for det, d in sets:
                est = MLEstimator(det.system, det.system.channel, det.system.codes, det.cfg.scene, MLConfig())
                with single_threaded():
                    params, energy, _ = ml_fits(est, d["y"], 50)
                L, m = d["y"].shape[-2:]
                counts += pooled_counts(estimates_from_fits(params, threshold_k(energy, L, m, ML_TAU),
                                                            cfg.scene.k_max), d)
            print(f"{snr:g} dB: ML, threshold K: F1 {_f1(counts):.4f} (TP {counts[0]:.0f}, FP {counts[1]:.0f}, "
                  f"FN {counts[2]:.0f})", flush=True)


if __name__ == "__main__":
    main()
