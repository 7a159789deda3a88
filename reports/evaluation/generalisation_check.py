"""Small checks outside the benchmark's single condition set: another channel seed, and L = 64 snapshots.

    PYTHONPATH=. python reports/evaluation/generalisation_check.py --seed 9 [--snapshots 16] [--n 100] [--snr 20]

Runs the ML estimator (K by MDL on its residuals: no tuning needed, valid for any L; and the benchmark's
threshold when L = 16) and the committed learned detector (trained on the channels of seeds 1-8, L = 16 and 64),
on n test scenes of the given dataset seed; prints F1 and worst-coordinate RMSE/CRB (own matched sources) with
95% scene-bootstrap intervals, as ``detection.summarise`` computes them, and each method's seconds per scene.
"""

from __future__ import annotations

import argparse
import json

import torch

from ris_model.benchmark import condition_data
from ris_model.config import load_config
from ris_model.detection import common_matched, summarise
from ris_model.detector_infer import load_detector
from ris_model.ml_estimator import MLConfig, MLEstimator
from ris_model.model_order import mdl_residual, threshold_k
from ris_model.scoring import score, truth_from
from ris_model.simulate import make_system


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--checkpoint", default="reports/evaluation/detector.pt")
    p.add_argument("--snapshots", type=int, default=16)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--snr", type=float, default=20.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/default.toml", [f"data.seed={args.seed}", f"channel.snapshots={args.snapshots}"])
    system = make_system(cfg)
    d = condition_data(cfg, system, "test", args.snr, args.n)
    truth = truth_from(d, system)
    ml = MLEstimator(system, system.channel, system.codes, cfg.scene, MLConfig()).path(d["y"])
    seconds = {}
    L, m = d["y"].shape[-2:]
    ks = {"ML, MDL K": mdl_residual(ml.energy, L, m)}
    if args.snapshots == 16:
        tau = json.load(open("reports/evaluation/results.json"))["threshold"]["tau"]
        ks["ML, threshold K (tau of seed 0)"] = threshold_k(ml.energy, L, m, tau)
    scores = [score(name, ml.estimates(k, cfg.scene.k_max), truth, k_used=k) for name, k in ks.items()]
    seconds = {name: ml.seconds / args.n for name in ks}
    det, _ = load_detector(args.checkpoint, cfg)
    for name, (est, k, sec) in det(d).items():
        scores.append(score(name, est, truth, k_used=k))
        seconds[name] = sec / args.n
    print(f"channel of dataset seed {args.seed} (the DFT codes are the same for every seed), L = {args.snapshots}, "
          f"{args.n} scenes at {args.snr:g} dB")
    for r in summarise(scores, truth, common_matched(scores, truth), reps=1000):
        worst = max(("phi", "theta", "r"), key=lambda c: r[f"own_ratio_{c}"] or 0.0)
        ratio, ci = r[f"own_ratio_{worst}"], r[f"own_ratio_{worst}_ci"]
        rtxt = "-" if ratio is None else f"{ratio:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] ({worst})"
        print(f"{r['method']}: F1 {r['f1']:.3f} [{r['f1_ci'][0]:.3f}, {r['f1_ci'][1]:.3f}], K acc {r['k_acc']:.3f}, "
              f"RMSE/CRB {rtxt} over {r['n_own']} sources, {seconds[r['method']]:.4f} s/scene")


if __name__ == "__main__":
    main()
