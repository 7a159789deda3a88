"""The localisation benchmark behind reports/evaluation: conditions, methods, timing and a per-condition cache.

    python -m ris_model benchmark --out reports/evaluation [--n 500] [--snr 0 10 20 30] [--val 200]
                                  [--learned CKPT] [--cache runs/benchmark]

Conditions: one per nominal SNR, each with its OWN scenes (test-split indices j * STRIDE + 0..n-1 for the j-th
SNR of ``SNR_SLOTS``: fresh positions, symbols and noise per condition), the config's channel and codes.
Methods on every scene of a condition (estimates cached per condition, so an interrupted run resumes):
- ML (``ml_estimator``): the nested fits k = 1..K_MAX once; K by the greedy-residual threshold (tuned on
  validation scenes for the best pooled F1), by MDL on the ML residuals, or the true K (reference);
- MUSIC on R_samp (``music``, default grid) with the true K and with the ML threshold's K;
- the learned pipeline, when a checkpoint of the learned detector (``detector_infer``) is given.
Time per scene: wall time of the method's own calls over the condition divided by its scenes, single-threaded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ris_model.config import RunConfig
from ris_model.detection import common_matched, summarise
from ris_model.metrics import GATE_DEG, match_scene
from ris_model.ml_estimator import MLConfig, MLEstimator
from ris_model.model_order import mdl_residual, residual_drop, threshold_k
from ris_model.music import Estimates, music, single_threaded
from ris_model.scoring import score, truth_from
from ris_model.simulate import System, make_system, simulate

logger = logging.getLogger(__name__)

STRIDE = 1_000_000  # scene-index offset between conditions: no scene, symbol or noise draw is shared
SNR_SLOTS = (0.0, 10.0, 20.0, 30.0, -10.0, -5.0, 5.0, 15.0, 25.0, 40.0)  # condition j uses slot j * STRIDE
CACHE_FORMAT = 1
LEARNED = "learned detector + ML refinement"  # = detector_infer.DETECTOR_REFINED (not imported: no circle)
TIMING_OFFSET = 2000  # validation-scene offset of ``back_to_back`` (the threshold uses indices 0..n_val - 1)
TIMING_SCENES, TIMING_REPEATS = 200, 2  # ``back_to_back``: scenes and passes over them
TIMING_CHUNK = 50  # scenes per call of either method in ``back_to_back``: the ML's batch in ``run_benchmark``
MUSIC_STEP_DEG = 1.0  # MUSIC grid step here (refined by Newton after the grid; 0.5 deg was 3x slower)


class BenchmarkError(ValueError):
    """Bad benchmark arguments (SNR not in SNR_SLOTS, too few scenes, unreadable cache)."""


def condition_data(cfg: RunConfig, system: System, split: str, snr_db: float, n: int, offset: int = 0) -> dict:
    """n scenes of ``split`` at nominal SNR ``snr_db``, from the condition's own index block."""
    if snr_db not in SNR_SLOTS:
        raise BenchmarkError(f"benchmark: nominal SNR {snr_db:g} dB has no scene block; use one of {SNR_SLOTS}")
    c = dataclasses.replace(cfg, scene=dataclasses.replace(cfg.scene, snr_db=(float(snr_db), float(snr_db))))
    start = SNR_SLOTS.index(snr_db) * STRIDE + offset
    return simulate(c, system, split, list(range(start, start + n)))


def _batched(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def ml_fits(estimator: MLEstimator, y: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    """Nested ML fits of all scenes (batched): params per k (B, k, 3), energies (B, K_MAX + 1), seconds."""
    paths = [estimator.path(y[sl]) for sl in _batched(y.shape[0], batch)]
    params = [torch.cat([p.params[k] for p in paths]) for k in range(len(paths[0].params))]
    return params, torch.cat([p.energy for p in paths]), sum(p.seconds for p in paths)


def estimates_from_fits(params: list[torch.Tensor], k: torch.Tensor, k_max: int) -> Estimates:
    from ris_model.ml_estimator import MLPath
    return MLPath(params=params, energy=torch.empty(0), seconds=0.0).estimates(k, k_max)


def pooled_counts(est: Estimates, data: dict) -> tuple[int, int, int]:
    """Pooled (TP, FP, FN) of estimates against the truth of ``data`` (the gate of ``metrics``)."""
    tp = fp = fn = 0
    for i in range(est.phi.shape[0]):
        e = tuple(t[i][est.mask[i]].numpy() for t in (est.phi, est.theta, est.r))
        m = data["mask"][i]
        t = tuple(data[n][i][m].numpy() for n in ("phi", "theta", "r"))
        _, _, ang = match_scene(e, t)
        good = int((ang <= GATE_DEG).sum())
        tp, fp, fn = tp + good, fp + len(e[0]) - good, fn + len(t[0]) - good
    return tp, fp, fn


def tune_threshold(cfg: RunConfig, system: System, estimator: MLEstimator, snrs: list[float], n_val: int,
                   batch: int) -> dict:
    """The greedy-residual threshold tau with the best pooled F1 on validation scenes (n_val per SNR)."""
    fits = []
    for snr in snrs:
        data = condition_data(cfg, system, "val", snr, n_val)
        params, energy, _ = ml_fits(estimator, data["y"], batch)
        fits.append((data, params, energy))
    L, m = fits[0][0]["y"].shape[-2:]
    drops = torch.cat([residual_drop(e, L, m) for _, _, e in fits]).reshape(-1)
    grid = np.unique(np.quantile(drops.numpy(), np.linspace(0.02, 0.98, 49)))
    best = (-1.0, float(grid[0]))
    for tau in grid:
        tot = np.zeros(3)
        for data, params, energy in fits:
            est = estimates_from_fits(params, threshold_k(energy, L, m, float(tau)), cfg.scene.k_max)
            tot += pooled_counts(est, data)
        f1 = 2 * tot[0] / max(2 * tot[0] + tot[1] + tot[2], 1)
        best = max(best, (f1, float(tau)))
    logger.info("threshold: tau = %.3g (validation F1 %.3f over %d scenes)", best[1], best[0], n_val * len(snrs))
    return {"tau": best[1], "val_f1": float(best[0]), "val_scenes": n_val * len(snrs), "val_snr_db": list(snrs)}


def run_condition(cfg: RunConfig, system: System, estimator: MLEstimator, snr: float, n: int, tau: float,
                  batch: int) -> dict:
    """Estimates, K used and seconds per method on the scenes of one condition (see the module docstring)."""
    data = condition_data(cfg, system, "test", snr, n)
    L, m = data["y"].shape[-2:]
    k_max = cfg.scene.k_max
    params, energy, ml_s = ml_fits(estimator, data["y"], batch)
    k_thr, k_mdl = threshold_k(energy, L, m, tau), mdl_residual(energy, L, m)
    music_cfg = dataclasses.replace(cfg.music, phi_step_deg=MUSIC_STEP_DEG, theta_step_deg=MUSIC_STEP_DEG)
    out = {"ML, threshold K": (estimates_from_fits(params, k_thr, k_max), k_thr, ml_s),
           "ML, MDL K": (estimates_from_fits(params, k_mdl, k_max), k_mdl, ml_s),
           "ML, true K": (estimates_from_fits(params, data["k"], k_max), None, ml_s)}
    for name, k in (("MUSIC R_samp, true K", data["k"]), ("MUSIC R_samp, ML threshold K", k_thr)):
        t0 = time.perf_counter()
        parts = [music(data["R_samp"][sl], k[sl], system, cfg.scene, music_cfg) for sl in _batched(n, batch)]
        est = Estimates(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Estimates)))
        out[name] = (est, None if name.endswith("true K") else k, time.perf_counter() - t0)
    return {"data": data, "methods": out, "energy": energy, "truth": truth_from(data, system)}


def back_to_back(cfg: RunConfig, system: System, estimator: MLEstimator, learned: object, snr: float = 20.0,
                 n: int = TIMING_SCENES, repeats: int = TIMING_REPEATS, chunk: int = TIMING_CHUNK) -> dict:
    """Wall seconds per scene of the ML estimator and the learned pipeline on the SAME n validation scenes
    (offset TIMING_OFFSET: not the threshold's), measured alike: one untimed warm-up pass of each method on the
    first chunk, then ``repeats`` passes over the n scenes in chunks of ``chunk``, ML and learned alternating
    chunk by chunk, so that a change of a shared machine's load hits both (the per-condition times of the
    tables were taken at different moments). ``ratio``: total ML time / total learned time over all repeats;
    ``ratios``: the same per repeat."""
    data = condition_data(cfg, system, "val", snr, n, offset=TIMING_OFFSET)
    parts = _batched(n, chunk)
    estimator.path(data["y"][parts[0]])  # warm-up, untimed (first-call set-up costs of either method)
    learned({"y": data["y"][parts[0]]})
    ml_s, lr_s = [], []
    for _ in range(repeats):
        t_ml = t_lr = 0.0
        for sl in parts:
            t0 = time.perf_counter()
            estimator.path(data["y"][sl])
            t_ml += time.perf_counter() - t0
            t0 = time.perf_counter()
            learned({"y": data["y"][sl]})
            t_lr += time.perf_counter() - t0
        ml_s.append(t_ml / n)
        lr_s.append(t_lr / n)
    logger.info("back to back: ML %s s/scene, learned %s s/scene", ml_s, lr_s)
    return {"snr_db": snr, "scenes": n, "chunk": chunk, "repeats": repeats, "ml_s": ml_s, "learned_s": lr_s,
            "ratios": [a / b for a, b in zip(ml_s, lr_s)], "ratio": sum(ml_s) / sum(lr_s)}


def cached_condition(cache: Path, key: str, compute: object) -> dict:
    """Load ``cache/key.pt`` or compute and save it (torch.save of tensors, Estimates as dicts)."""
    path = cache / f"{key}.pt"
    if path.exists():
        obj = torch.load(path, weights_only=False)
        if obj.get("format") == CACHE_FORMAT:
            return obj["result"]
        logger.warning("cache %s has format %s, expected %s: recomputing", path, obj.get("format"), CACHE_FORMAT)
    result = compute()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CACHE_FORMAT, "result": result}, path)
    return result


def score_condition(result: dict, reps: int) -> tuple[list[dict], dict]:
    """Rows of ``detection.summarise`` for one condition, and the per-method seconds per scene."""
    truth = result["truth"]
    scores = [score(name, est, truth, k_used=k) for name, (est, k, _) in result["methods"].items()]
    headline = [s for s in scores if "true K" not in s.method and "MDL" not in s.method]
    rows = summarise(scores, truth, common_matched(headline, truth), reps=reps)
    n = truth.n_scenes
    seconds = {name: sec / n for name, (_, _, sec) in result["methods"].items()}
    for row in rows:
        row["s_per_scene"] = seconds[row["method"]]
        row["common_methods"] = [s.method for s in headline]
    return rows, seconds


def run_benchmark(cfg: RunConfig, snrs: list[float], n: int, n_val: int, cache: Path, reps: int = 1000,
                  batch: int = 50, learned: object | None = None, learned_tag: str = "none",
                  only: list[float] | None = None) -> dict:
    """Every condition (cached), scored; returns the results dict ``bench_report`` writes.

    ``only``: compute just these conditions (e.g. one process per core); the others are taken from the
    cache when there and left out otherwise. The threshold is tuned on all ``snrs`` either way."""
    if n < 1 or n_val < 1:
        raise BenchmarkError(f"benchmark: need n >= 1 test and n_val >= 1 validation scenes, got {n}, {n_val}")
    system = make_system(cfg)
    with single_threaded():
        estimator = MLEstimator(system, system.channel, system.codes, cfg.scene, MLConfig())
        tag = f"seed{cfg.data.seed}_L{cfg.channel.snapshots}"
        tuned = cached_condition(cache, f"threshold_{tag}_v{n_val}_{'_'.join(f'{s:g}' for s in snrs)}",
                                 lambda: tune_threshold(cfg, system, estimator, snrs, n_val, batch))
        conditions = {}
        for snr in snrs:
            key = f"cond_{tag}_snr{snr:g}_n{n}_tau{tuned['tau']:.6g}"
            if only is not None and snr not in only and not (cache / f"{key}.pt").exists():
                continue
            result = cached_condition(cache, key, lambda: run_condition(cfg, system, estimator, snr, n, tuned["tau"],
                                                                      batch))
            if learned is not None:  # cached on its own: a new checkpoint does not recompute the baselines
                lkey = f"learned_{tag}_snr{snr:g}_n{n}_{learned_tag}"
                result["methods"].update(cached_condition(cache, lkey, lambda: learned(result["data"])))
            rows, _ = score_condition(result, reps)
            conditions[f"{snr:g}"] = rows
        timing = None if learned is None else back_to_back(cfg, system, estimator, learned)
    return {"timing": timing, "config": cfg.name, "seed": cfg.data.seed, "snapshots": cfg.channel.snapshots,
            "n_bs": cfg.geometry.n_bs, "n_ris": cfg.geometry.n_ris, "rician_k": cfg.channel.rician_k,
            "per_sample_channel": cfg.channel.per_sample, "test_scenes_per_condition": n,
            "val_scenes_per_snr": n_val, "bootstrap_reps": reps, "threshold": tuned, "ml": dataclasses.asdict(MLConfig()),
            "music": dataclasses.asdict(cfg.music) | {"phi_step_deg": MUSIC_STEP_DEG, "theta_step_deg": MUSIC_STEP_DEG}, "gate_deg": GATE_DEG, "conditions": conditions}


__all__ = ["STRIDE", "SNR_SLOTS", "BenchmarkError", "condition_data", "ml_fits", "tune_threshold", "back_to_back",
           "run_condition", "score_condition", "run_benchmark", "pooled_counts"]
