"""Hungarian matching and pooled localisation errors."""

from __future__ import annotations

import math

import pytest
import torch

from ris_model.metrics import MetricsError, localization_errors, match_scene
from ris_model.music import Estimates

K_MAX = 5


def scenes(rows: list[list[tuple[float, float, float]]]) -> tuple[torch.Tensor, ...]:
    """(phi_deg, theta_deg, r) lists -> phi, theta (radians), r, mask (B, K_MAX)."""
    b = len(rows)
    phi, theta = torch.zeros(b, K_MAX, dtype=torch.float64), torch.zeros(b, K_MAX, dtype=torch.float64)
    r, mask = torch.ones(b, K_MAX, dtype=torch.float64), torch.zeros(b, K_MAX, dtype=torch.bool)
    for i, row in enumerate(rows):
        for j, (p, t, rr) in enumerate(row):
            phi[i, j], theta[i, j], r[i, j], mask[i, j] = math.radians(p), math.radians(t), rr, True
    return phi, theta, r, mask


def estimates(rows: list[list[tuple[float, float, float]]]) -> Estimates:
    phi, theta, r, mask = scenes(rows)
    return Estimates(phi=phi, theta=theta, r=r, mask=mask, k=mask.sum(-1))


TRUTH = [[(-30, 10, 1.0), (20, -5, 4.0), (45, 20, 8.0)], [(0, 0, 2.0)]]


def test_perfect_estimates_in_any_order():
    est = estimates([[(45, 20, 8.0), (-30, 10, 1.0), (20, -5, 4.0)], [(0, 0, 2.0)]])
    m = localization_errors(est, *scenes(TRUTH))
    assert m["rmse_phi_deg"] == pytest.approx(0, abs=1e-12) and m["rmse_r_m"] == pytest.approx(0, abs=1e-12)
    assert (m["n_matched"], m["misses"], m["false_alarms"], m["success_rate"]) == (4, 0, 0, 1.0)


def test_rmse_pools_all_matched_sources_not_per_scene_means():
    # scene 0: 1 source off by 3 deg in phi; scene 1: 2 exact sources
    est = estimates([[(3, 0, 1.0)], [(10, 0, 1.0), (-10, 0, 2.0)]])
    truth = scenes([[(0, 0, 1.0)], [(10, 0, 1.0), (-10, 0, 2.0)]])
    m = localization_errors(est, *truth)
    assert m["rmse_phi_deg"] == pytest.approx(math.sqrt(9 / 3), rel=1e-9)  # a per-scene mean would give 1.5
    assert m["rmse_theta_deg"] == pytest.approx(0, abs=1e-12)


def test_range_error_in_metres_and_relative():
    est = estimates([[(0, 0, 1.1), (30, 0, 4.0)]])
    m = localization_errors(est, *scenes([[(0, 0, 1.0), (30, 0, 5.0)]]))
    assert m["rmse_r_m"] == pytest.approx(math.sqrt((0.01 + 1.0) / 2))
    assert m["rmse_r_rel"] == pytest.approx(math.sqrt((0.01 + 0.04) / 2))


def test_gate_misses_and_false_alarms():
    est = estimates([[(-30, 10, 1.0), (20, -5, 4.0), (45, 35, 8.0), (-50, -20, 3.0)], []])
    m = localization_errors(est, *scenes(TRUTH), gate_deg=5.0)
    # scene 0: third estimate is 15 deg off (outside the gate): 1 miss, 2 false alarms; scene 1: 1 miss
    assert (m["n_true"], m["n_est"], m["n_matched"]) == (4, 4, 2)
    assert (m["misses"], m["false_alarms"], m["success_rate"]) == (2, 2, 0.0)
    assert localization_errors(est, *scenes(TRUTH), gate_deg=20.0)["n_matched"] == 3


def test_range_term_resolves_sources_in_the_same_direction():
    truth = scenes([[(10, 0, 1.0), (10, 0, 6.0)]])
    est = estimates([[(10, 0, 5.5), (10, 0, 1.1)]])
    rows, cols, _ = match_scene(tuple(x[0][:2].numpy() for x in (est.phi, est.theta, est.r)),
                                tuple(x[0][:2].numpy() for x in truth[:3]))
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}
    m = localization_errors(est, *truth)
    assert m["rmse_r_m"] == pytest.approx(math.sqrt((0.25 + 0.01) / 2))


def test_nothing_matched_gives_nan_rmse_and_counts():
    m = localization_errors(estimates([[]]), *scenes([[(0, 0, 1.0)]]))
    assert math.isnan(m["rmse_phi_deg"]) and m["misses"] == 1 and m["success_rate"] == 0.0


def test_batch_size_mismatch_is_rejected():
    with pytest.raises(MetricsError, match="same batch"):
        localization_errors(estimates([[(0, 0, 1.0)]]), *scenes(TRUTH))
