"""Seconds per scene of the ML estimator and the learned detector measured back to back in ONE process on the
same scenes, by ``benchmark.back_to_back`` (the goal check of tables.md): an untimed warm-up pass of each
method, then ``--repeats`` passes over ``--n`` validation scenes in chunks of ``--chunk``, ML and learned
alternating chunk by chunk; the ratio is total ML time / total learned time.

    PYTHONPATH=. python reports/evaluation/timing_check.py [--n 200] [--snr 20] [--repeats 2] [--chunk 50]
                                                             [--relocate off]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from ris_model.benchmark import TIMING_CHUNK, TIMING_REPEATS, TIMING_SCENES, back_to_back
from ris_model.config import load_config
from ris_model.detector_infer import load_detector
from ris_model.ml_estimator import MLConfig, MLEstimator
from ris_model.music import single_threaded


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=TIMING_SCENES)
    p.add_argument("--snr", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=TIMING_REPEATS)
    p.add_argument("--chunk", type=int, default=TIMING_CHUNK)
    p.add_argument("--relocate", default=None, help="gate of the weakest source's re-search, 'off' for none "
                   "(default: the pipeline's)")
    p.add_argument("--checkpoint", default="reports/evaluation/detector.pt")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/default.toml", [])
    loc, _ = load_detector(args.checkpoint, cfg)
    if args.relocate is not None:
        loc.params = dataclasses.replace(loc.params, relocate=None if args.relocate == "off" else float(args.relocate))
    ml = MLEstimator(loc.system, loc.system.channel, loc.system.codes, cfg.scene, MLConfig())
    with single_threaded():
        t = back_to_back(cfg, loc.system, ml, loc, args.snr, args.n, args.repeats, args.chunk)
    for rep, (a, b, r) in enumerate(zip(t["ml_s"], t["learned_s"], t["ratios"])):
        print(f"pass {rep}: ML {a:.3f} s/scene, learned detector + refinement {b * 1e3:.2f} ms/scene ({r:.1f}x)")
    print(f"{args.n} scenes at {args.snr:g} dB, {args.repeats} passes, chunks of {args.chunk}: total ML / total "
          f"learned {t['ratio']:.1f}x")


if __name__ == "__main__":
    main()
