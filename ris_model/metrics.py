"""Matching of estimated to true sources (Hungarian) and pooled localisation errors.

Matching cost between an estimate and a true source (per scene, scipy's linear_sum_assignment):

    cost = angular distance between the two directions u(phi, theta), in degrees
           + range_weight_deg * |ln(r_est / r_true)|

The range term is in "degrees per unit of log-range": with the default 10, a 10 % range error costs
about as much as 1 degree of direction error. It only breaks ties between sources in similar
directions; the gate below uses the angular distance alone.

A matched pair counts (is "within the gate") when its angular distance is <= gate_deg. True sources
without such a pair are misses, estimates without one are false alarms. RMSEs pool the squared
errors of ALL gated pairs over all scenes (not a mean of per-scene RMSEs). A scene is a success when
every true source is matched within the gate (false alarms do not matter for success; they are
counted separately).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ris_model.geometry import direction
from ris_model.music import Estimates

RANGE_WEIGHT_DEG = 10.0
GATE_DEG = 5.0


class MetricsError(ValueError):
    """Estimates and truth do not fit together (shapes, batch sizes)."""


def _angular_distance_deg(phi_a: np.ndarray, theta_a: np.ndarray, phi_b: np.ndarray, theta_b: np.ndarray) -> np.ndarray:
    """Pairwise great-circle distance (len a, len b) in degrees between directions (radians in)."""
    ua = direction(torch.from_numpy(phi_a), torch.from_numpy(theta_a)).numpy()
    ub = direction(torch.from_numpy(phi_b), torch.from_numpy(theta_b)).numpy()
    return np.degrees(np.arccos(np.clip(ua @ ub.T, -1.0, 1.0)))


def match_scene(est: tuple[np.ndarray, np.ndarray, np.ndarray], truth: tuple[np.ndarray, np.ndarray, np.ndarray],
                range_weight_deg: float = RANGE_WEIGHT_DEG) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching of one scene. est/truth = (phi, theta, r) arrays (radians, metres).

    Returns (est_idx, true_idx, angular distance in degrees) of the min(n_est, n_true) pairs.
    """
    if len(est[0]) == 0 or len(truth[0]) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    ang = _angular_distance_deg(est[0], est[1], truth[0], truth[1])
    rng = np.abs(np.log(est[2][:, None] / truth[2][None, :]))
    rows, cols = linear_sum_assignment(ang + range_weight_deg * rng)
    return rows, cols, ang[rows, cols]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def localization_errors(est: Estimates, truth_phi: Tensor, truth_theta: Tensor, truth_r: Tensor,
                        truth_mask: Tensor, gate_deg: float = GATE_DEG,
                        range_weight_deg: float = RANGE_WEIGHT_DEG) -> dict[str, float]:
    """Pooled errors of MUSIC estimates against the truth (both (B, K_MAX), radians / metres).

    Keys: rmse_phi_deg, rmse_theta_deg, rmse_r_m, rmse_r_rel (relative range error), n_scenes,
    n_true, n_est, n_matched, misses, false_alarms, success_rate. RMSEs are NaN when nothing matched.
    """
    if est.phi.shape[0] != truth_phi.shape[0]:
        raise MetricsError(f"localization_errors: {est.phi.shape[0]} estimated scenes vs "
                           f"{truth_phi.shape[0]} true scenes; pass the estimates of the same batch")
    e = [_np(t) for t in (est.phi, est.theta, est.r)]
    t = [_np(x) for x in (truth_phi, truth_theta, truth_r)]
    em, tm = est.mask.cpu().numpy(), truth_mask.cpu().numpy()
    sq = {"phi": [], "theta": [], "r": [], "r_rel": []}
    n_matched = successes = 0
    for b in range(em.shape[0]):
        eb = tuple(x[b][em[b]] for x in e)
        tb = tuple(x[b][tm[b]] for x in t)
        rows, cols, ang = match_scene(eb, tb, range_weight_deg)
        good = ang <= gate_deg
        rows, cols = rows[good], cols[good]
        n_matched += int(good.sum())
        successes += int(good.sum() == len(tb[0]))
        sq["phi"].append(np.degrees(eb[0][rows] - tb[0][cols]) ** 2)
        sq["theta"].append(np.degrees(eb[1][rows] - tb[1][cols]) ** 2)
        sq["r"].append((eb[2][rows] - tb[2][cols]) ** 2)
        sq["r_rel"].append(((eb[2][rows] - tb[2][cols]) / tb[2][cols]) ** 2)

    def rmse(name: str) -> float:
        v = np.concatenate(sq[name])
        return float(np.sqrt(v.mean())) if v.size else math.nan

    n_true, n_est = int(tm.sum()), int(em.sum())
    return {"rmse_phi_deg": rmse("phi"), "rmse_theta_deg": rmse("theta"), "rmse_r_m": rmse("r"),
            "rmse_r_rel": rmse("r_rel"), "n_scenes": int(em.shape[0]), "n_true": n_true, "n_est": n_est,
            "n_matched": n_matched, "misses": n_true - n_matched, "false_alarms": n_est - n_matched,
            "success_rate": successes / max(em.shape[0], 1)}


__all__ = ["RANGE_WEIGHT_DEG", "GATE_DEG", "MetricsError", "match_scene", "localization_errors"]
