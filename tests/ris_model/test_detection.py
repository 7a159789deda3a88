"""F1, matched fraction, false alarms, RMSE/CRB on own and common sources, bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ris_model.detection import MIN_SOURCES, common_matched, summarise
from ris_model.scoring import MethodScores, Truth


def make_truth(b: int, k: int = 2) -> Truth:
    mask = np.zeros((b, 5), dtype=bool)
    mask[:, :k] = True
    z = np.zeros((b, 5))
    crb = np.where(mask[..., None], np.array([0.1, 0.2, 0.05]), 0.0)
    return Truth(z, z, z + 1, mask, mask.sum(1), z, crb)


def make_scores(truth: Truth, name: str, miss_every: int, fa: int, err_scale: float) -> MethodScores:
    matched = truth.mask.copy()
    matched[::miss_every, 0] = False
    err = np.where(matched[..., None], err_scale * np.array([0.1, 0.2, 0.05]), math.nan)
    return MethodScores(name, False, matched, err, np.full(truth.n_scenes, fa), None)


def test_f1_counts_misses_and_false_alarms():
    truth = make_truth(40)
    s = make_scores(truth, "a", miss_every=4, fa=1, err_scale=1.0)  # 10 misses of 80 sources, 40 false alarms
    row = summarise([s], truth, common_matched([s], truth), reps=50)[0]
    tp, fn, fp = 70, 10, 40
    assert row["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert row["matched_frac"] == pytest.approx(70 / 80)
    assert row["fa_per_scene"] == pytest.approx(1.0)
    assert row["own_ratio_phi"] == pytest.approx(1.0) and row["own_ratio_r"] == pytest.approx(1.0)
    lo, hi = row["f1_ci"]
    assert lo <= row["f1"] <= hi and hi - lo > 0


def test_common_set_is_the_intersection_and_ratios_need_enough_sources():
    truth = make_truth(40)
    good = make_scores(truth, "good", miss_every=1, fa=0, err_scale=1.0)  # misses slot 0 of every scene
    bad = make_scores(truth, "bad", miss_every=2, fa=0, err_scale=3.0)
    common = common_matched([good, bad], truth)
    assert common.sum() == 40 and not common[:, 0].any()
    rows = summarise([good, bad], truth, common, reps=20)
    assert rows[1]["common_ratio_theta"] == pytest.approx(3.0)
    small = make_truth(10)
    s = make_scores(small, "few", miss_every=1, fa=0, err_scale=1.0)  # 10 matched sources < MIN_SOURCES
    row = summarise([s], small, common_matched([s], small), reps=20)[0]
    assert row["n_own"] < MIN_SOURCES and row["own_ratio_phi"] is None and row["own_ratio_phi_ci"] is None
    assert row["f1"] is not None
