"""MUSIC on R_true and R_samp over a fixed test set at 0, 10, 20 dB, against the Cramer-Rao bound.

    python benchmarks/music_bench.py [--scenes 32] [--snr 0 10 20] [--set music.phi_step_deg=1.0 ...]

Prints the evaluation table of ``ris_model.scoring`` (matched fraction, false alarms, per-source error /
CRB on matched sources, RMSE and CRB over the same sources, binned by per-source realised SNR), R's
energy fraction in span{a_k}, the spectrum throughput of the shared MUSIC call with its FLOP bound, the
time per stage, and one ratio measured in this run: the
spectrum of B scenes computed with the steering shared across the batch vs B one-scene calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ris_model.config import load_config  # noqa: E402
from ris_model.geometry import search_grid  # noqa: E402
from ris_model.music import null_spectrum, signal_subspace  # noqa: E402
from ris_model.music_eval import format_speed, run_music_eval  # noqa: E402
from ris_model.scoring import format_rows  # noqa: E402
from ris_model.simulate import make_system, simulate  # noqa: E402


def steering_reuse_ratio(cfg, n_scenes: int = 8, n_points: int = 100_000) -> tuple[float, float]:
    """Seconds for the spectrum of n_scenes on n_points grid points: one batched call vs one call per scene."""
    system = make_system(cfg)
    d = simulate(cfg, system, "test", list(range(n_scenes)))
    _, es = signal_subspace(d["R_samp"], cfg.scene.k_max)
    es = es * (torch.arange(cfg.scene.k_max) < d["k"][:, None])[:, None, :]
    phi, theta, r = (ax for ax in torch.meshgrid(*search_grid(cfg.scene, cfg.music, torch.float32), indexing="ij"))
    pts = [x.reshape(-1)[:n_points] for x in (phi, theta, r)]
    t0 = time.perf_counter()
    batched = null_spectrum(es, system, *pts)
    t1 = time.perf_counter()
    single = torch.cat([null_spectrum(es[b:b + 1], system, *pts) for b in range(n_scenes)])
    t2 = time.perf_counter()
    assert torch.allclose(batched, single, atol=1e-5)
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--scenes", type=int, default=32)
    ap.add_argument("--snr", type=float, nargs="+", default=[0.0, 10.0, 20.0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; grid {cfg.music.phi_step_deg} deg x "
          f"{cfg.music.theta_step_deg} deg x {cfg.music.n_range} range planes; {args.scenes} test scenes")
    t0 = time.perf_counter()
    rows, r0 = run_music_eval(cfg, args.scenes, args.snr)
    print(format_rows(rows))
    print(format_speed(r0))
    stages = ", ".join(f"{s} {r0[s + '_s']:.2f} s" for s in ("eigh", "spectrum", "peaks", "refine"))
    print(f"MUSIC stages: {stages}; {r0['music_s']:.2f} s total for {r0['scenes_in_call']} scenes "
          f"({r0['music_s'] / r0['scenes_in_call'] * 1e3:.0f} ms/scene); evaluation incl. simulation and CRB "
          f"{time.perf_counter() - t0:.1f} s")
    tb, ts = steering_reuse_ratio(cfg)
    print(f"steering shared across the batch: 8 scenes x 100k points in {tb:.2f} s vs {ts:.2f} s one scene "
          f"at a time -> {ts / tb:.1f}x")


if __name__ == "__main__":
    main()
