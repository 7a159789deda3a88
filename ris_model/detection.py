"""Detection and accuracy summaries of one evaluation condition, with scene-bootstrap 95% intervals.

Per method, over the scenes of one condition (one nominal SNR):
- detection: true positives TP = true sources matched within ``metrics.GATE_DEG`` (Hungarian, ``scoring.score``),
  misses FN = true sources without a partner, false alarms FP = estimates without one;
  F1 = 2 TP / (2 TP + FP + FN) (pooled over the scenes), matched fraction TP / (TP + FN), FP per scene, and the
  fraction of scenes whose K was right;
- accuracy: RMSE / CRB per coordinate = sqrt(sum err^2 / sum CRB^2) over a set of sources: the method's own
  matched sources, and the sources EVERY compared method matched (``common``). Both are reported only over
  at least ``MIN_SOURCES`` sources (fewer: None, shown as '-').
Intervals: ``reps`` bootstrap resamples of the scenes (with replacement; every statistic of a replicate uses
the same resample), percentile 2.5 / 97.5.
"""

from __future__ import annotations

import math

import numpy as np

from ris_model.scoring import COORDS, MethodScores, Truth

MIN_SOURCES = 30  # fewer sources than this: no ratio is shown


def _scene_sums(s: MethodScores, truth: Truth, sel: np.ndarray) -> dict[str, np.ndarray]:
    """Per-scene sums (B,) and (B, 3) over the selected sources ``sel`` (B, K_MAX) of squared errors / CRBs."""
    err2 = np.where(sel[..., None], s.err, 0.0) ** 2  # err is NaN exactly where a source is unmatched
    crb2 = np.where(sel[..., None], truth.crb ** 2, 0.0) if truth.crb is not None else np.zeros_like(err2)
    return {"sse": err2.sum(1), "scrb": crb2.sum(1), "cnt": sel.sum(1).astype(np.float64)}


def _stats(w: np.ndarray, per: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Statistics for scene weights w (R, B) (1 = the data as observed, bootstrap counts otherwise)."""
    tp, fn, fp = (w @ per[n] for n in ("tp", "fn", "fp"))
    n_scn = w.sum(-1)
    out = {"f1": 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300), "matched_frac": tp / np.maximum(tp + fn, 1e-300),
           "fa_per_scene": fp / n_scn}
    if "k_right" in per:
        out["k_acc"] = (w @ per["k_right"]) / n_scn
    for key in ("own", "common"):
        sse, scrb = w @ per[f"{key}_sse"], w @ per[f"{key}_scrb"]
        for j, c in enumerate(COORDS):
            with np.errstate(invalid="ignore", divide="ignore"):
                out[f"{key}_ratio_{c}"] = np.sqrt(sse[..., j] / scrb[..., j])
                out[f"{key}_rmse_{c}"] = np.sqrt(sse[..., j] / np.maximum(w @ per[f"{key}_cnt"], 1e-300))
                out[f"{key}_crb_{c}"] = np.sqrt(scrb[..., j] / np.maximum(w @ per[f"{key}_cnt"], 1e-300))
    return out


def summarise(scores: list[MethodScores], truth: Truth, common: np.ndarray, reps: int = 1000, seed: int = 0
              ) -> list[dict]:
    """One row per method: point values and [lo, hi] 95% bootstrap intervals (see the module docstring).

    common (B, K_MAX): the sources every compared method matched."""
    b = truth.n_scenes
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(b, np.full(b, 1.0 / b), size=reps).astype(np.float64)  # same resamples for all
    rows = []
    for s in scores:
        matched = s.matched & truth.mask
        per = {"tp": matched.sum(1).astype(np.float64), "fn": (truth.mask & ~matched).sum(1).astype(np.float64),
               "fp": s.false_alarms.astype(np.float64)}
        if s.k_right is not None:
            per["k_right"] = s.k_right.astype(np.float64)
        for key, sel in (("own", matched), ("common", common & matched)):
            for n, v in _scene_sums(s, truth, sel).items():
                per[f"{key}_{n}"] = v
        point = _stats(np.ones((1, b)), per)
        boot = _stats(weights, per)
        row = {"method": s.method, "n_scenes": b, "n_sources": int(truth.mask.sum()),
               "n_own": int(per["own_cnt"].sum()), "n_common": int(per["common_cnt"].sum())}
        for name, val in point.items():
            key = name.split("_")[0]
            small = key in ("own", "common") and row[f"n_{key}"] < MIN_SOURCES
            v = float(val[0])
            lo, hi = np.nanpercentile(boot[name], [2.5, 97.5]) if np.isfinite(boot[name]).any() else (math.nan,) * 2
            row[name] = None if small or math.isnan(v) else v
            row[f"{name}_ci"] = None if small or math.isnan(v) else [float(lo), float(hi)]
        rows.append(row)
    return rows


def common_matched(scores: list[MethodScores], truth: Truth) -> np.ndarray:
    """(B, K_MAX) true sources matched by every method of ``scores``."""
    out = truth.mask.copy()
    for s in scores:
        out &= s.matched
    return out


__all__ = ["MIN_SOURCES", "summarise", "common_matched"]
