"""Why the ML search is whitened (docs/physics.md section 4b): the same ML estimator with and without the
search whitener on the same scenes, against a refinement started at the truth.

    PYTHONPATH=. python reports/evaluation/whitening_check.py [--n 48] [--snr 20]

Prints, per variant: scenes whose final fit (true K) has a higher ML cost than the fit started at the truth
(a search failure), matched fraction, and RMSE/CRB (phi / theta / r) on matched sources.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ris_model.benchmark import condition_data
from ris_model.config import load_config
from ris_model.ml_estimator import MLConfig, MLEstimator, _box, energy, levenberg_marquardt
from ris_model.music import Estimates
from ris_model.scoring import score, truth_from
from ris_model.simulate import make_system


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--snr", type=float, default=20.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/default.toml", [])
    system = make_system(cfg)
    d = condition_data(cfg, system, "val", args.snr, args.n, offset=1000)  # not the threshold-tuning scenes
    truth = truth_from(d, system)
    lo, hi = _box(cfg.scene)
    variants = {"whitened search (default)": MLConfig(), "unwhitened search": MLConfig(whiten_delta=1e6)}
    oracle_e = torch.zeros(args.n, dtype=torch.float64)
    x_or = {}
    est0 = MLEstimator(system, system.channel, system.codes, cfg.scene, MLConfig())
    for k in d["k"].unique().tolist():
        sel = d["k"] == k
        x0 = torch.stack([d["phi"][sel, :k], d["theta"][sel, :k], d["r"][sel, :k].log()], -1)
        x_or[k] = levenberg_marquardt(x0, est0.phis, d["y"][sel], system, lo, hi, 50)
        oracle_e[sel] = energy(x_or[k], est0.phis, d["y"][sel], system)
    rows = {}
    for name, mcfg in variants.items():
        path = MLEstimator(system, system.channel, system.codes, cfg.scene, mcfg).path(d["y"])
        e_fit = path.energy.gather(1, d["k"][:, None])[:, 0]
        rows[name] = (path.estimates(d["k"], cfg.scene.k_max), int((e_fit > 1.001 * oracle_e).sum()))
    phi, theta, r = (torch.zeros(args.n, cfg.scene.k_max, dtype=torch.float64) for _ in range(3))
    r.fill_(1.0)
    for k, x in x_or.items():
        sel = d["k"] == k
        phi[sel, :k], theta[sel, :k], r[sel, :k] = x[..., 0], x[..., 1], x[..., 2].exp()
    rows["started at the truth (reference)"] = (Estimates(phi, theta, r, d["mask"], d["k"]), 0)
    print(f"{args.n} scenes, nominal {args.snr:g} dB, true K")
    for name, (est, worse) in rows.items():
        s = score(name, est, truth)
        m = s.matched & truth.mask
        ratio = [np.sqrt(np.mean(s.err[m][:, j] ** 2) / np.mean(truth.crb[m][:, j] ** 2)) for j in range(3)]
        print(f"{name}: {worse} scenes worse than the truth start, matched {m.sum() / truth.mask.sum():.3f}, "
              f"RMSE/CRB {ratio[0]:.2f} / {ratio[1]:.2f} / {ratio[2]:.2f}")


if __name__ == "__main__":
    main()
