"""Goal check of the benchmark report: met / NOT met from the rows, intervals printed, missing data said."""

from __future__ import annotations

from ris_model.bench_report import GOAL_ML_RATIO, LEARNED_SLOTS, condition_table, goal_check, limits
from ris_model.benchmark import LEARNED


def row(method: str, f1: float, ratio: float, seconds: float) -> dict:
    r = {"method": method, "f1": f1, "f1_ci": [f1 - 0.01, f1 + 0.01], "matched_frac": f1, "matched_frac_ci": None,
         "fa_per_scene": 0.1, "fa_per_scene_ci": None, "k_acc": None, "n_own": 100, "n_common": 50,
         "s_per_scene": seconds, "n_scenes": 500, "n_sources": 1500}
    for key in ("own", "common"):
        for c in ("phi", "theta", "r"):
            r[f"{key}_ratio_{c}"] = ratio
            r[f"{key}_ratio_{c}_ci"] = [ratio * 0.9, ratio * 1.1]
    return r


def results(ml_ratio: float, learned_f1: float) -> dict:
    conds = {s: [row("ML, threshold K", 0.9, ml_ratio, 2.0), row(LEARNED, learned_f1, 2.5, 0.02)]
             for s in ("10", "20", "30")}
    return {"conditions": conds}


def test_goals_met_and_missed_follow_the_numbers():
    good = "\n".join(goal_check(results(ml_ratio=1.1, learned_f1=0.89)))
    assert good.count("NOT met") == 0 and "100.0x faster" in good
    bad = "\n".join(goal_check(results(ml_ratio=GOAL_ML_RATIO + 0.2, learned_f1=0.5)))
    assert "ML RMSE/CRB (worst coordinate, own matched sources) at 20 dB: 1.70 [1.53, 1.87]" in bad
    assert "-0.400 (goal >= -0.02: NOT met)" in bad


def test_missing_conditions_are_said_and_tables_show_intervals():
    lines = goal_check({"conditions": {"0": []}})
    assert all("not measured" in line for line in lines)
    table = condition_table([row("ML, threshold K", 0.9, 1.0, 2.0)])
    assert "0.900 [0.890, 0.910]" in table[2]


def test_limits_name_the_weakest_source_re_search_among_the_stages_after_the_peaks():
    res = results(ml_ratio=1.1, learned_f1=0.99)
    res["conditions"]["20"].append(row(LEARNED_SLOTS, 0.85, 5.0, 0.005))
    for r in res["conditions"]["20"]:
        r["k_acc"] = 0.9
    res["learned"] = {"relocate": 400.0, "detect_steps": 2}
    text = "\n".join(limits(res))
    assert "(refinement, pruning by the ML residual, re-search of the weakest source where its drop statistic is " \
           "below 400, 2 detect-subtract steps)" in text
    res["learned"]["relocate"] = None
    assert "re-search" not in "\n".join(limits(res))
