"""reports/evaluation helpers: goal check, K summary and figures from scoring rows (no model needed)."""

from __future__ import annotations

import torch

from ris_model.eval_report import figures, goal_check, k_summary
from ris_model.scoring import score, score_rows

from test_scoring import estimates, truth

# Two sources at 10 dB and one at 20 dB; the "learned" method finds all three exactly (error/CRB 0 would
# be degenerate, so it is off by 0.05 deg with CRB 0.05: ratio 1), the baseline only the 20 dB one.
TRUTH = truth([[(0, 0, 2.0, 10.0, 0.05), (40, 10, 5.0, 10.0, 0.05)], [(-30, -5, 1.0, 19.0, 0.05)]])
GOOD = estimates([[(0.05, 0, 2.0), (40.05, 10, 5.0)], [(-30.05, -5, 1.0)]])
BASE = estimates([[(-50, 20, 5.0)], [(-30.5, -5, 1.0)]])
ROWS = score_rows([score("learned, K head", GOOD, TRUTH, k_used=torch.tensor([2, 1])),
                   score("MUSIC R_samp, MDL K", BASE, TRUTH, k_used=torch.tensor([1, 1]))], TRUTH)


def test_goal_check_compares_with_the_best_estimated_k_baseline():
    lines = goal_check(ROWS)
    assert lines[0].startswith("- 10 dB (2 sources): learned 1.000 vs MUSIC R_samp, MDL K 0.000 -> +1.000")
    assert "met" in lines[0] and "NOT" not in lines[0]
    assert lines[1].startswith("- 20 dB (1 sources): learned 1.000 vs MUSIC R_samp, MDL K 1.000 -> +0.000")
    assert "NOT met" in lines[1]
    assert "phi 1.00" in lines[2] and "(goal <= 2 in angle: met)" in lines[2]


def test_k_summary_lists_every_estimator_per_scene_bin():
    lines = k_summary(ROWS)
    assert lines[0] == "| K estimate (used by) | 10 dB | 20 dB | all |"
    assert lines[2] == "| learned, K head | 1.000 (1) | 1.000 (1) | 1.000 (2) |"
    assert lines[3] == "| MUSIC R_samp, MDL K | 0.000 (1) | 1.000 (1) | 0.500 (2) |"


def test_figures_are_written(tmp_path):
    paths = figures(ROWS, tmp_path, min_sources=1)
    assert [p.name for p in paths] == ["matched_vs_snr.png", "error_crb_vs_snr.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
