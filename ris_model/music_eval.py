"""MUSIC on R_true and R_samp over a fixed test set against the Cramer-Rao bound (the `music` command).

The test set is samples 0..n-1 of the "test" split with the SNR pinned to each value in turn. The SNR
is the last scene draw and numpy's uniform(a, a) still consumes one draw, so the scenes (K, angles,
ranges, powers) are identical across SNRs; only the noise level changes. R_true does not depend on the
SNR: it is localised once (checked bit-identical) and reported on every SNR row.
All covariances go through ONE ``music`` call, so every grid steering chunk is computed once and
projected on all subspaces together; the throughput figures come from that call.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from ris_model.config import RunConfig
from ris_model.crb import crb_batch, rms_bound
from ris_model.metrics import localization_errors
from ris_model.music import Estimates, estimate_k, music, signal_subspace
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
                   sources: tuple[str, ...] = ("true", "samp")) -> list[dict]:
    """One row per (source, SNR): pooled RMSEs, the CRB at the same scenes (sqrt of the mean CRB
    variance over all sources), success/miss/false-alarm counts, the accuracy of ``estimate_k`` on
    the same matrices, R's energy fraction in span{a_k} (chance: mean K/N) and the spectrum
    throughput of the shared MUSIC call (grid points x N x scenes per second, and its FLOP bound)."""
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
    mean_k = float(k_true.double().mean())
    speed = _throughput(timings, system.n, len(mats) * n_samples, mean_k)
    rows = []
    for snr in snr_db_list:
        d = data[snr]
        bound = crb_batch(d, system)
        a = system.steer(d["phi"], d["theta"], d["r"])
        for src in sources:
            j = jobs[(src, snr)]
            R = d[SOURCES[src]]
            m = localization_errors(_split(est, j * n_samples, (j + 1) * n_samples),
                                    d["phi"], d["theta"], d["r"], d["mask"])
            k_hat = estimate_k(signal_subspace(R, cfg.scene.k_max)[0], cfg.scene.k_max)
            rows.append({"source": src, "snr_db": float(snr), **m,
                         **{f"crb_{name}": rms_bound(bound[name], d["mask"])
                            for name in ("phi_deg", "theta_deg", "r_m")},
                         "k_acc": float((k_hat == d["k"]).double().mean()),
                         "energy_frac": float(subspace_energy_fraction(R, a, d["mask"]).mean()),
                         "energy_chance": mean_k / system.n, **speed})
    return rows


_COLUMNS = [  # (header, key, format)
    ("R", "source", "{:>4}"), ("SNR", "snr_db", "{:>5.0f}"),
    ("rmse phi", "rmse_phi_deg", "{:>8.3f}"), ("crb phi", "crb_phi_deg", "{:>8.3f}"),
    ("rmse th", "rmse_theta_deg", "{:>8.3f}"), ("crb th", "crb_theta_deg", "{:>8.3f}"),
    ("rmse r", "rmse_r_m", "{:>7.3f}"), ("crb r", "crb_r_m", "{:>7.3f}"),
    ("success", "success_rate", "{:>7.2f}"), ("miss", "misses", "{:>5d}"), ("FA", "false_alarms", "{:>4d}"),
    ("K acc", "k_acc", "{:>5.2f}"), ("E frac", "energy_frac", "{:>6.3f}"),
]


def format_table(rows: list[dict]) -> str:
    """Plain-text table of ``run_music_eval`` rows (angles in degrees, ranges in metres), with the
    shared throughput figures as a footer."""
    if not rows:
        return "(no rows)"
    head = " ".join(f"{h:>{len(fmt.format(rows[0][k]))}}" for h, k, fmt in _COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(" ".join(fmt.format(row[k]) for _, k, fmt in _COLUMNS))
    r0 = rows[0]
    lines += [
        f"scenes: {r0['n_scenes']} ({r0['n_true']} sources) per row; gate 5 deg; CRB = sqrt(mean CRB variance); "
        f"E frac chance level = {r0['energy_chance']:.3f}",
        f"spectrum: {r0['grid_points']} grid points x N x {r0['scenes_in_call']} scenes in {r0['spectrum_s']:.2f} s "
        f"(MUSIC total {r0['music_s']:.2f} s) = {r0['throughput']:.3g} point-elements/s; FLOP bound "
        f"{r0['throughput_flop_bound']:.3g}/s (GEMM-only, measured complex64 GEMM peak "
        f"{r0['gemm_peak_flops'] / 1e9:.1f} GFLOP/s) -> {r0['throughput'] / r0['throughput_flop_bound']:.1%} of bound",
    ]
    return "\n".join(lines)


__all__ = ["EvalError", "SOURCES", "gemm_peak_flops", "run_music_eval", "format_table"]
