"""The cause table as a table: observation in, key and sentence out."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ris_stability.locate.causes import Observation, exp_overflow_threshold, explain, is_linalg_op, node_base, op_base
from ris_stability.locate.finding import TensorSummary


def summ(name="self", dtype="float32", lo=0.0, hi=1.0, nan=0, inf=0, zeros=0, spectral=None):
    return TensorSummary(name, (4,), dtype, lo, hi, max(abs(lo), abs(hi)), nan, inf, zeros, spectral or {})


OUT_NAN = summ("output", nan=1)
OUT_INF = summ("output", inf=1)
TIED = {"max_cluster": 118.0, "cluster_value": 1e-3, "min_gap": 0.0, "amplification": math.inf}
NEAR = {"max_cluster": 3.0, "cluster_value": 0.25, "min_gap": 2e-8, "amplification": 5e7}
GAPPED = {"max_cluster": 1.0, "cluster_value": math.nan, "min_gap": 1e-6, "amplification": 1e6}

CASES = [
    # id, observation, key, exact text or fragment
    ("log-zero", Observation("forward", "aten.log", culprit=(0.0,), output=OUT_INF), "log_zero", "=log of 0"),
    ("log-zero-no-culprit", Observation("forward", "aten.log", inputs=(summ(zeros=2),)), "log_zero", "=log of 0"),
    ("log-negative", Observation("forward", "aten.log", culprit=(-1.0,)), "log_negative", "below 0"),
    ("log1p-minus-one", Observation("forward", "aten.log1p", culprit=(-1.0,)), "log_zero", "=log1p of -1"),
    ("div-0-0", Observation("forward", "aten.div.Tensor", culprit=(0.0, 0.0)), "div_zero_zero", "=0/0 in division"),
    ("div-inplace-0-0", Observation("backward", "aten.div_.Tensor", culprit=(0.0, 0.0), node="XBackward0"),
     "div_zero_zero", "=0/0 in division in XBackward0"),
    ("div-by-0", Observation("forward", "aten.div.Tensor", culprit=(1.0, 0.0)), "div_by_zero", "=division by 0"),
    ("div-overflow", Observation("forward", "aten.div.Tensor", inputs=(summ(),), culprit=(1e30, 1e-30)),
     "div_overflow", "largest float32"),
    ("div-nan-no-culprit", Observation("forward", "aten.div.Tensor", output=OUT_NAN), "div_zero_zero", "0/0"),
    ("exp", Observation("forward", "aten.exp", inputs=(summ(hi=100.0),)), "exp_overflow",
     "=overflow to inf in exp (argument up to 100 > log(max float32) = 88.72)"),
    ("pow-0-neg", Observation("forward", "aten.pow.Tensor_Scalar", culprit=(0.0, -2.0)), "pow_zero_negative",
     "negative power"),
    ("pow-neg-frac", Observation("forward", "aten.pow.Tensor_Scalar", culprit=(-2.0, 0.5)),
     "pow_negative_fractional", "fractional"),
    ("pow-overflow", Observation("forward", "aten.pow.Tensor_Scalar", culprit=(1e20, 3.0)), "pow_overflow",
     "=overflow in pow"),
    ("sqrt-negative", Observation("forward", "aten.sqrt", culprit=(-1.0,)), "sqrt_negative", "negative"),
    ("mm-overflow", Observation("forward", "aten.mm"), "overflow", "=overflow to inf in mm"),
    ("acos-domain", Observation("forward", "aten.acos", culprit=(1.5,)), "domain", "outside its domain"),
    ("linalg-forward", Observation("forward", "aten._linalg_eigh"), "linalg_nonfinite", "finite matrix"),
    ("constant", Observation("forward", "aten.mul.Tensor", culprit=(1.0, math.nan)), "nonfinite_constant",
     "non-finite constant"),
    ("generic", Observation("forward", "aten.erfinv", output=OUT_INF), "nonfinite",
     "=non-finite output (inf) of aten.erfinv from finite inputs"),
    ("sqrt-backward", Observation("backward", "aten.div.Tensor", node="SqrtBackward0"), "sqrt_backward_zero",
     "sqrt backward at 0"),
    ("pow-backward", Observation("backward", "aten.pow.Tensor_Scalar", node="PowBackward0"), "pow_backward",
     "pow backward overflow"),
    ("div-backward", Observation("backward", "aten.div.Tensor", node="DivBackward0"), "div_backward_overflow",
     "division backward"),
    ("log-backward", Observation("backward", "aten.div.Tensor", node="LogBackward0"), "log_backward_zero",
     "log backward at 0"),
    ("norm-backward", Observation("backward", "aten.div.Tensor", node="LinalgVectorNormBackward0"),
     "norm_backward_zero", "zero vector"),
    ("eigh-exact-tie", Observation("backward", "aten.div_.Tensor", node="LinalgEighBackward0",
                                   inputs=(summ(), summ("eigh values", spectral=TIED))), "eigh_exact_tie",
     "=eigenvector gradient through exactly tied eigenvalues (cluster of 118 at 1.0e-03): 0/0 in eigh backward"),
    ("eigh-near-tie", Observation("backward", "aten.div_.Tensor", node="LinalgEighBackward0",
                                  inputs=(summ(spectral=NEAR),)), "eigh_near_tie", "cluster of 3 at 2.5e-01"),
    ("eigh-small-gap", Observation("backward", "aten.mul.Tensor", node="LinalgEighBackward0", output=OUT_INF,
                                   inputs=(summ(spectral=GAPPED),)), "eigh_small_gap", "smallest gap 1.0e-06"),
    ("eigh-no-stats", Observation("backward", "aten.div_.Tensor", node="LinalgEighBackward0"), "eigh_backward",
     "gaps unknown"),
    ("gap-aware-custom", Observation("backward", "aten.div.Tensor", node="EighGapAwareBackward",
                                     inputs=(summ(spectral=TIED),)), "eigh_exact_tie", "cluster of 118"),
    ("svd-tie", Observation("backward", "aten.div.Tensor", node="LinalgSvdBackward0",
                            inputs=(summ(spectral=TIED),)), "svd_exact_tie", "0/0 in svd backward"),
    ("unknown-node", Observation("backward", "aten.mul.Tensor", node="MysteryBackward0"), "overflow",
     "=overflow to inf in mul in MysteryBackward0"),
    ("error-not-pd", Observation("error", "aten.linalg_cholesky_ex", message="linalg.cholesky: The factorization "
                                 "could not be completed because the input is not positive-definite (the leading "
                                 "minor of order 2 is not positive-definite)."), "not_positive_definite",
     "matrix is not positive definite: linalg.cholesky: The factorization"),
    ("error-phase", Observation("error", node="LinalgEighBackward0", message="linalg_eigh_backward: The eigenvectors"
                                " in the complex case are specified up to multiplication by e^{i phi}. The specified"
                                " loss function depends on this quantity, so it is ill-defined."),
     "eigenvector_phase", "arbitrary phase of complex eigenvectors"),
    ("error-singular", Observation("error", "aten.linalg_solve_ex", message="linalg.solve: The solver failed because"
                                   " the input matrix is singular."), "singular_matrix", "matrix is singular"),
    ("error-converge", Observation("error", "aten._linalg_eigh", message="linalg.eigh: The algorithm failed to "
                                   "converge because the input matrix is ill-conditioned"), "no_convergence",
     "did not converge"),
    ("error-other", Observation("error", "", message="planted failure\nsecond line"), "raised",
     "=the call raised: planted failure"),
    ("input", Observation("input", location="batch['x']", inputs=(summ(nan=3, inf=1),)), "bad_input",
     "=argument batch['x'] already holds 3 NaN and 1 Inf before the call"),
    ("hidden-input", Observation("input", "aten.exp", inputs=(summ(nan=1),)), "bad_hidden_input",
     "a tensor that was not an argument"),
]


@pytest.mark.parametrize("obs,key,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cause_table(obs, key, text):
    cause = explain(obs)
    assert cause.key == key
    if text.startswith("="):
        assert cause.text == text[1:]
    else:
        assert text in cause.text
    assert cause.remedies and all(isinstance(r, str) and r for r in cause.remedies)


def test_eigh_remedies_include_the_documented_options():
    cause = explain(CASES[[c[0] for c in CASES].index("eigh-exact-tie")][1])
    assert "with ris_stability.gap_aware():" in cause.remedies[0]  # the one-line fix comes first
    assert not any("loss.eigh_backward" in r or "ris_model" in r for r in cause.remedies)  # generic words only
    assert any("eigenvalue-only" in r for r in cause.remedies)
    assert any("float64" in r for r in cause.remedies)
    assert any("diagonal loading" in r for r in cause.remedies)


def _spectral_obs(node, dtype, n, lam_max, cluster_value, lam_min, leak=None, function="", location="m.py:7"):
    stats = {"n": float(n), "lambda_max": lam_max, "lambda_min": lam_min, "max_cluster": 119.0,
             "cluster_value": cluster_value,
             "min_gap": 0.0, "amplification": math.inf}
    if leak is not None:
        stats["cluster_leak"] = leak
    return Observation("backward", "aten.div.Tensor", node=node, function=function, location=location,
                       inputs=(summ(), summ("values", dtype=dtype, spectral=stats)))


REMEDY_CASES = [
    # id, observation, words that must appear in cause + remedies, words that must not
    ("svd-rank-deficient", _spectral_obs("LinalgSvdBackward0", "float32", 144, 3.0, 0.0, 0.0, leak=0.0,
                                         function="torch.linalg.svd"),
     ["SVD", "singular values", "rank-deficient: loading will not help", "with ris_stability.gap_aware():",
      "torch.linalg.svd at m.py:7", "units of s", "exact"], ["eigenvalue", "float64", "remove the loading"]),
    # seed-nan's numbers: the loading level is within n eps max|lambda|, but it lifts the smallest eigenvalue too
    ("eigh-loading-level", _spectral_obs("LinalgEighBackward0", "float32", 144, 0.7, 8.6e-6, 8.6e-6),
     ["eigenvalues", "lifted above the rounding floor", "diagonal loading", "with ris_stability.gap_aware():",
      "torch.linalg.eigh at m.py:7", "exact when the loss is invariant", "float64"],
     ["singular", "loading will not help"]),
    ("eigh-floor-float64", _spectral_obs("LinalgEighBackward0", "float64", 10, 1.0, 1e-15, -1e-16),
     ["rank-deficient: loading will not help"], ["lifted above the rounding floor", "float64"]),
    ("eigh-not-invariant", _spectral_obs("LinalgEighBackward0", "float32", 8, 1.0, 0.5, 0.1, leak=0.3),
     ["tells the eigenvectors inside the tied cluster apart", "share 3.0e-01"], ["is exact"]),
]


@pytest.mark.parametrize("obs,present,absent", [c[1:] for c in REMEDY_CASES], ids=[c[0] for c in REMEDY_CASES])
def test_spectral_remedies_follow_the_evidence(obs, present, absent):
    cause = explain(obs)
    text = " | ".join((cause.text,) + cause.remedies)
    for word in present:
        assert word in text
    for word in absent:
        assert word not in text


def test_not_invariant_loss_gets_the_subspace_remedy_first():
    cause = explain(REMEDY_CASES[-1][1])
    assert cause.remedies[0].startswith("make the loss depend only on a subspace")
    assert "with ris_stability.gap_aware():" in cause.remedies[1]


@pytest.mark.parametrize("op,base,linalg", [
    ("aten.div_.Tensor", "div", False), ("aten.log", "log", False), ("aten._linalg_eigh", "linalg_eigh", True),
    ("aten.linalg_cholesky_ex", "linalg_cholesky_ex", True), ("aten.detach", "detach", False),
    ("aten.relu", "relu", False), ("aten.det", "det", True), ("aten.lu_unpack", "lu_unpack", True),
])
def test_op_names(op, base, linalg):
    assert op_base(op) == base
    assert is_linalg_op(op) is linalg


def test_node_base_and_exp_threshold():
    assert node_base("LinalgEighBackward0") == "linalgeigh"
    assert node_base("SqrtBackward0") == "sqrt"
    assert exp_overflow_threshold("float32") == pytest.approx(88.7228, abs=1e-3)
    assert exp_overflow_threshold("complex128") == pytest.approx(709.7827, abs=1e-3)


_PHASES = st.sampled_from(["forward", "backward", "error", "input"])
_NAMES = st.sampled_from(["aten.log", "aten.div.Tensor", "aten.exp", "aten.mm", "aten.pow.Tensor_Scalar",
                          "aten._linalg_eigh", "aten.whatever", ""])
_NODES = st.sampled_from(["", "SqrtBackward0", "LinalgEighBackward0", "UnknownBackward0", "DivBackward0"])
_VALUES = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.complex_numbers())


@settings(deadline=None, max_examples=50)
@given(phase=_PHASES, op=_NAMES, node=_NODES,
       culprit=st.one_of(st.none(), st.tuples(_VALUES, _VALUES)), message=st.text(max_size=40))
def test_every_observation_gets_a_sentence_and_remedies(phase, op, node, culprit, message):
    cause = explain(Observation(phase, op, node=node if phase == "backward" else "", culprit=culprit,
                                message=message))
    assert cause.key and cause.text.strip() and "\n" not in cause.text
    assert cause.remedies


@pytest.mark.parametrize("node, what", [("LinalgEighBackward0", "eigh"), ("LinalgSvdBackward0", "svd")])
@pytest.mark.parametrize("size", [2, 3, 144])
@pytest.mark.parametrize("gap, kind", [(0.0, "exact_tie"), (3e-9, "near_tie")])
def test_tie_clusters_of_every_size_exact_and_near(node, what, size, gap, kind):
    """A pair is already a cluster: two exactly tied eigenvalues are 0/0, not a 1/gap overflow."""
    spectral = {"max_cluster": float(size), "cluster_value": 0.5, "min_gap": gap,
                "amplification": math.inf if gap == 0 else 1 / gap}
    cause = explain(Observation("backward", "aten.div.Tensor", node=node, inputs=(summ(spectral=spectral),)))
    assert cause.key == f"{what}_{kind}"
    assert f"cluster of {size} at 5.0e-01" in cause.text
    assert ("0/0" in cause.text) == (gap == 0) and ("1/gap overflow" in cause.text) == (gap > 0)


def test_a_single_eigenvalue_is_no_cluster():
    spectral = {"max_cluster": 1.0, "cluster_value": math.nan, "min_gap": 3e-9, "amplification": 1 / 3e-9}
    cause = explain(Observation("backward", "aten.div.Tensor", node="LinalgEighBackward0",
                                inputs=(summ(spectral=spectral),)))
    assert cause.key == "eigh_small_gap" and "cluster" not in cause.text
