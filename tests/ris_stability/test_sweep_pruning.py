"""StabilityWatch: verdicts from planted monitor rows and events (no Optuna, no training)."""

from __future__ import annotations

import math

import pytest

from ris_stability.sweep.pruning import StabilityRules, StabilityWatch, op_of


def tie_event(step: int, site: str = "model.white:linalg.eigh", vec_grad: bool = True) -> dict:
    return {"kind": "tied_eigenvalues", "step": step, "message": "", "data": {
        "matrix": site, "max_cluster": 7.0, "cluster_value": 0.25, "vec_grad": vec_grad, "location": "net.py:12"}}


def nonfinite_event(step: int) -> dict:
    return {"kind": "nonfinite_grad", "step": step, "message": f"non-finite gradient at step {step}", "data": {}}


def row(step: int, norm: float, gap: float = 0.5, vec_grad: float = 1.0) -> dict:
    return {"step": step, "grad/_total": norm, "mat/model.white:linalg.eigh/min_gap": gap,
            "mat/model.white:linalg.eigh/vec_grad": vec_grad}


def test_tie_names_the_matrix_cluster_and_op_and_wins_over_the_nonfinite_step_it_causes():
    w = StabilityWatch()
    w.observe("event", nonfinite_event(0))  # the monitor writes the non-finite event before the step row
    w.observe("step", row(0, math.nan, gap=0.0))
    w.observe("event", tie_event(0))
    v = w.end_step(0)
    assert v.rule == "tie" and v.step == 0
    assert "7 eigenvalues of model.white:linalg.eigh tied at 2.500e-01" in v.reason
    assert "linalg.eigh's backward" in v.reason and "net.py:12" in v.reason
    assert w.summary()["min_gap"] == 0.0 and w.summary()["min_gap_site"] == "model.white:linalg.eigh"


@pytest.mark.parametrize("site, vec_grad", [("loss.sub:eigh_gap_aware", True), ("model.white:linalg.eigh", False)],
                         ids=["tie-safe-backward", "eigenvectors-unused"])
def test_harmless_ties_do_not_prune(site, vec_grad):
    w = StabilityWatch()
    w.observe("event", tie_event(3, site, vec_grad))
    assert w.end_step(3) is None
    assert len(w.ties) == (1 if vec_grad else 0)


def test_nonfinite_budget():
    w = StabilityWatch(StabilityRules(nonfinite_budget=2))
    for step in range(2):
        w.observe("event", nonfinite_event(step))
        assert w.end_step(step) is None
    w.observe("event", nonfinite_event(5))
    v = w.end_step(5)
    assert v.rule == "nonfinite" and v.step == 5
    assert v.reason.startswith("3 non-finite step(s) > budget 2 (first: non-finite gradient at step 0")


def test_gradient_explosion_against_the_early_baseline():
    w = StabilityWatch(StabilityRules(explode_factor=100.0, baseline_steps=3))
    for step, norm in enumerate([1.0, 2.0, 3.0, 150.0]):  # baseline median 2: 150 < 200 is not yet an explosion
        w.observe("step", row(step, norm))
        assert w.end_step(step) is None
    w.observe("step", row(4, 250.0))
    v = w.end_step(4)
    assert v.rule == "grad_explosion" and "125 x the baseline 2" in v.reason


def test_first_verdict_sticks_and_gap_ignores_sites_without_vector_gradient():
    w = StabilityWatch()
    w.observe("step", row(0, 1.0, gap=1e-9, vec_grad=0.0))
    assert w.summary()["min_gap"] is None
    w.observe("event", tie_event(1))
    first = w.end_step(1)
    w.observe("event", nonfinite_event(2))
    assert w.end_step(2) is first


def test_rules_reject_nonsense():
    with pytest.raises(ValueError, match="explode_factor"):
        StabilityRules(explode_factor=0.5)


def test_op_of_site_names():
    assert op_of("loss.subspace:linalg.eigh") == "linalg.eigh"
    assert op_of("model.a:eigh_gap_aware@x.py:3") == "eigh_gap_aware"
