"""Seconds per scene of the ML estimator and the learned detector measured back to back in ONE process on the
same scenes (the benchmark's per-condition times were taken at different moments of a shared machine's load).

    PYTHONPATH=. python reports/evaluation/timing_check.py [--n 50] [--snr 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from ris_model.benchmark import condition_data
from ris_model.config import load_config
from ris_model.detector_infer import DETECTOR_PEAKS, DETECTOR_REFINED, load_detector
from ris_model.ml_estimator import MLConfig, MLEstimator


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--snr", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--checkpoint", default="reports/evaluation/detector.pt")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/default.toml", [])
    loc, _ = load_detector(args.checkpoint, cfg)
    ml = MLEstimator(loc.system, loc.system.channel, loc.system.codes, cfg.scene, MLConfig())
    d = condition_data(cfg, loc.system, "val", args.snr, args.n, offset=2000)
    for rep in range(args.repeats):  # interleaved, so a change of machine load hits both
        t0 = time.perf_counter()
        ml.path(d["y"])
        t_ml = (time.perf_counter() - t0) / args.n
        out = loc(d)
        t_slots, t_ref = out[DETECTOR_PEAKS][2] / args.n, out[DETECTOR_REFINED][2] / args.n
        print(f"repeat {rep}: ML {t_ml:.3f} s/scene, learned detector + refinement {t_ref:.4f} s/scene "
              f"({t_ml / t_ref:.1f}x), peaks alone {t_slots:.4f} s/scene ({t_ml / t_slots:.0f}x)")


if __name__ == "__main__":
    main()
