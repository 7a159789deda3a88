"""MUSIC on R_true and R_samp over a fixed test set against the Cramer-Rao bound (the `music` command).

Rows come from ``scoring.score_rows`` (per-source error / CRB on matched sources, binned by realised SNR)
and print with ``scoring.format_rows``, the table every command uses.

The test set is samples 0..n-1 of the "test" split with the SNR pinned to each value in turn. The SNR
is the last scene draw and numpy's uniform(a, a) still consumes one draw, so the scenes (K, angles,
ranges, powers) are identical across SNRs; only the noise level changes. R_true does not depend on the
SNR: it is localised once (checked bit-identical) and scored at every SNR.
All covariances go through ONE ``music`` call, so every grid steering chunk is computed once and
projected on all subspaces together; the throughput figures come from that call.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from ris_model.config import RunConfig
from ris_model.music import Estimates, music
from ris_model.scoring import concat_truths, score, score_rows, truth_from
from ris_model.simulate import make_system, simulate, subspace_energy_fraction

SOURCES = {"true": "R_true", "samp": "R_samp"}
FLOPS_PER_CMAC = 8  # one complex multiply-add = 4 real multiplies + 4 real adds


class EvalError(ValueError):
    """Bad arguments to the MUSIC evaluation."""


def gemm_peak_flops(n: int = 1024, repeats: int = 3) -> float:
    """Measured complex64 GEMM rate (real FLOP/s) on this machine: the denominator of the FLOP bound."""
    a = torch.randn(n, n, dtype=torch.complex64)
    a @ a  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return FLOPS_PER_CMAC * n**3 / best


def _split(est: Estimates, start: int, stop: int) -> Estimates:
    return Estimates(*(getattr(est, f.name)[start:stop] for f in dataclasses.fields(Estimates)))


def _check(n_samples: int, snr_db_list: list[float], sources: tuple[str, ...]) -> None:
    if n_samples < 1:
        raise EvalError(f"music eval: n_samples must be >= 1, got {n_samples}")
    if not snr_db_list:
        raise EvalError("music eval: snr_db_list is empty; pass at least one SNR in dB")
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise EvalError(f"music eval: unknown source(s) {bad}; valid: {', '.join(SOURCES)}")


def _stack_unique(data: dict[float, dict], sources: tuple[str, ...],
                  snr_db_list: list[float]) -> tuple[dict[tuple[str, float], int], list[torch.Tensor]]:
    """Covariance blocks to localise: (source, snr) -> block index; bit-identical blocks are shared."""
    jobs: dict[tuple[str, float], int] = {}
    mats: list[torch.Tensor] = []
    for src in sources:
        for snr in snr_db_list:
            R = data[snr][SOURCES[src]]
            j = next((jobs[(src, s)] for s in snr_db_list
                      if (src, s) in jobs and torch.equal(mats[jobs[(src, s)]], R)), None)
            if j is None:
                j = len(mats)
                mats.append(R)
            jobs[(src, snr)] = j
    return jobs, mats


def _throughput(timings: dict[str, float], n: int, n_scenes: int, mean_k: float) -> dict[str, float]:
    """Spectrum rate (grid points x N x scenes / s) and its GEMM-only FLOP bound (8 k FLOPs each)."""
    peak = gemm_peak_flops()
    stages = ("eigh", "spectrum", "peaks", "refine")
    return {"grid_points": int(timings["grid_points"]), "scenes_in_call": n_scenes,
            **{f"{stage}_s": timings[stage] for stage in stages},
            "music_s": sum(timings[stage] for stage in stages),
            "throughput": timings["grid_points"] * n * n_scenes / timings["spectrum"],
            "throughput_flop_bound": peak / (FLOPS_PER_CMAC * mean_k), "gemm_peak_flops": peak}


def run_music_eval(cfg: RunConfig, n_samples: int, snr_db_list: list[float],
                   sources: tuple[str, ...] = ("true", "samp")) -> tuple[list[dict], dict[str, float]]:
    """``scoring`` rows of MUSIC with the true K on R_true (oracle: no CRB) and on R_samp, the test scenes
    0..n-1 at every nominal SNR pooled and binned by per-source realised SNR, and the throughput of the
    shared MUSIC call (grid points x N x scenes per second, and its FLOP bound)."""
    sources = tuple(sources)
    _check(n_samples, snr_db_list, sources)
    system = make_system(cfg)
    data = {}
    for snr in snr_db_list:
        c = dataclasses.replace(cfg, scene=dataclasses.replace(cfg.scene, snr_db=(float(snr), float(snr))))
        data[snr] = simulate(c, system, "test", list(range(n_samples)))
    k_true = data[snr_db_list[0]]["k"]
    jobs, mats = _stack_unique(data, sources, snr_db_list)
    timings: dict[str, float] = {}
    est = music(torch.cat(mats), k_true.repeat(len(mats)), system, cfg.scene, cfg.music, timings=timings)
    speed = _throughput(timings, system.n, len(mats) * n_samples, float(k_true.double().mean()))
    for snr in snr_db_list:  # information content of each matrix: its trace inside span{a_k} (chance: K/N)
        a = system.steer(data[snr]["phi"], data[snr]["theta"], data[snr]["r"])
        for src in sources:
            frac = subspace_energy_fraction(data[snr][SOURCES[src]], a, data[snr]["mask"])
            speed[f"energy_frac {SOURCES[src]} {snr:g} dB"] = float(frac.mean())
    speed["energy_frac chance"] = float(k_true.double().mean()) / system.n
    truth = concat_truths([truth_from(data[snr], system) for snr in snr_db_list])
    scores = []
    for src in sources:
        parts = [_split(est, jobs[(src, snr)] * n_samples, (jobs[(src, snr)] + 1) * n_samples) for snr in snr_db_list]
        pooled = Estimates(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Estimates)))
        scores.append(score(f"MUSIC {SOURCES[src]}, true K" + (" (oracle)" if src == "true" else ""), pooled, truth,
                            oracle=src == "true"))
    return score_rows(scores, truth), speed


def format_speed(speed: dict[str, float]) -> str:
    """The footer of the ``music`` command: information content of the matrices, then throughput."""
    info = ", ".join(f"{k.split(' ', 1)[1]} {v:.3f}" for k, v in speed.items() if k.startswith("energy_frac"))
    return (f"trace fraction in span{{a_k}}: {info}\n"
            f"spectrum: {speed['grid_points']} grid points x N x {speed['scenes_in_call']} scenes in "
            f"{speed['spectrum_s']:.2f} s (MUSIC total {speed['music_s']:.2f} s) = {speed['throughput']:.3g} "
            f"point-elements/s; FLOP bound {speed['throughput_flop_bound']:.3g}/s (GEMM-only, measured complex64 "
            f"GEMM peak {speed['gemm_peak_flops'] / 1e9:.1f} GFLOP/s) -> "
            f"{speed['throughput'] / speed['throughput_flop_bound']:.1%} of bound")


__all__ = ["EvalError", "SOURCES", "gemm_peak_flops", "run_music_eval", "format_speed"]
