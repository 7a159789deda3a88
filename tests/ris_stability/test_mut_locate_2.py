"""The cause table at its edges: the sentence and the key a user reads for the boundary cases of each rule
(0 ** 0 is no fault, a float32 0 denominator is no underflow, eig's own rule...), and a half-precision
division by 0 found by the locator itself. Pure calls of ``explain`` except where a run is named."""
from __future__ import annotations

import math

import pytest
import torch

from ris_stability.locate import locate_nonfinite
from ris_stability.locate.causes import Observation, exp_overflow_threshold, explain
from ris_stability.locate.finding import TensorSummary


def summ(name="self", dtype="float32", lo=0.0, hi=1.0, nan=0, inf=0, zeros=0, spectral=None):
    absmax = None if lo is None else max(abs(lo), abs(hi))
    return TensorSummary(name, (4,), dtype, lo, hi, absmax, nan, inf, zeros, spectral or {})


def _pow(culprit):
    return explain(Observation("forward", "aten.pow.Tensor_Tensor", culprit=culprit))


# --- pow ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("culprit, key", [
    ((0.0, -2.0), "pow_zero_negative"),
    ((0.0, 0.0), "pow_overflow"),  # 0 ** 0 is 1: not the zero-to-a-negative-power rule
    ((0.0, 0.5), "pow_overflow"),  # 0 ** 0.5 is 0: neither rule
    ((0.0, 2.0), "pow_overflow"),
    ((1.0, -1.0), "pow_overflow"),  # a negative power of a non-zero base
    ((-2.0, 0.5), "pow_negative_fractional"),
    ((-2.0, 2.0), "pow_overflow"),  # a negative base to an integer power is real
    ((2.0, 0.5), "pow_overflow"),  # a fractional power of a positive base is real
    ((0.5, 0.5), "pow_overflow"),
    (None, "pow_overflow"),  # no culprit recorded (not elementwise)
])
def test_pow_rules_fire_only_on_their_own_domain(culprit, key):
    assert _pow(culprit).key == key


def test_pow_sentences():
    assert _pow((0.0, -1.0)).text == "0 raised to a negative power"
    assert _pow((-1.0, 0.5)).text == "negative base raised to a fractional power (NaN)"
    assert _pow((1e20, 3.0)).text == "overflow in pow"


# --- exp ----------------------------------------------------------------------------------------------
def test_exp_names_the_threshold_only_when_the_argument_range_is_known():
    assert explain(Observation("forward", "aten.exp")).text == "overflow to inf in exp"
    no_finite = summ(lo=None, hi=None, inf=4)  # every entry of the argument already infinite: no range
    assert explain(Observation("forward", "aten.exp", inputs=(no_finite,))).text == "overflow to inf in exp"


def test_exp_threshold_of_an_unknown_dtype_name_is_float32s():
    assert exp_overflow_threshold("not_a_dtype") == pytest.approx(math.log(torch.finfo(torch.float32).max))


# --- division -----------------------------------------------------------------------------------------
def test_a_float32_zero_denominator_is_plain_division_by_zero():
    obs = Observation("forward", "aten.div.Tensor", culprit=(1.0, 0.0), inputs=(summ(), summ("other")))
    cause = explain(obs)
    assert (cause.key, cause.text) == ("div_by_zero", "division by 0")


@pytest.mark.parametrize("dtype, tiny, root", [("float16", "6.1e-05", "7.8e-03"), ("bfloat16", "1.2e-38", "1.1e-19")])
def test_a_half_precision_zero_denominator_is_called_an_underflow(dtype, tiny, root):
    obs = Observation("forward", "aten.div.Tensor", culprit=(1.0, 0.0),
                      inputs=(summ(dtype="float32"), summ("other", dtype=dtype)))
    cause = explain(obs)
    assert cause.key == "div_by_zero"
    assert cause.text == (f"division by 0 in {dtype}: the denominator is 0, most likely underflowed ({dtype} "
                          f"flushes magnitudes below ~{tiny} toward 0; squares of values below ~{root} vanish)")
    assert cause.remedies[0].startswith("compute norms and reductions in float32")
    assert len(cause.remedies) == 3


def test_the_locator_calls_an_underflowed_float16_norm_an_underflow():
    def normalise(x):
        return (x / (x * x).sum()).sum()  # 1e-4 squared is 1e-8: below float16's smallest subnormal

    f = locate_nonfinite(normalise, torch.full((2,), 1e-4, dtype=torch.float16, requires_grad=True))
    assert f.phase == "forward" and f.op == "aten.div.Tensor"
    assert f.cause.startswith("division by 0 in float16: the denominator is 0, most likely underflowed")
    assert f.culprit.endswith("-> inf") and "other=0.0" in f.culprit


def test_division_without_full_evidence():
    nan_out = summ("output", lo=None, hi=None, nan=1)
    assert explain(Observation("forward", "aten.div.Tensor", output=nan_out)).text == "0/0 in division"
    # only the numerator is unknown (not broadcastable to the output): the denominator 1e-30 says overflow
    one_known = explain(Observation("forward", "aten.div.Tensor", culprit=(None, 1e-30), output=nan_out))
    assert one_known.key == "div_overflow"
    no_inputs = explain(Observation("forward", "aten.div.Tensor", culprit=(1e30, 1e-30)))
    assert no_inputs.text == "overflow in division (|a/b| exceeds the largest float)"


# --- input ----------------------------------------------------------------------------------------------
def test_input_sentences_without_a_summary_or_a_path():
    assert explain(Observation("input", location="batch")).text == (
        "argument batch already holds NaN/Inf before the call")
    assert explain(Observation("input")).text == "argument ? already holds NaN/Inf before the call"


# --- phase error ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("message, key", [
    ("Matrix is not positive definite", "not_positive_definite"),  # spelled without the hyphen
    ("The eigenvectors are ill-defined for this loss", "eigenvector_phase"),  # without the e^{i phi}
    ("failed to compute the eigenvectors", "raised"),  # eigenvectors, but nothing ill-defined
    ("the result is ill-defined", "raised"),
])
def test_error_messages_are_read_by_their_words(message, key):
    assert explain(Observation("error", "aten._linalg_eigh", message=message)).key == key


def test_a_raised_error_names_the_op_else_the_function_and_its_first_line():
    assert explain(Observation("error", "aten.mm", function="torch.mm", message="boom\nmore")).text == (
        "aten.mm raised: boom")
    assert explain(Observation("error", function="torch.linalg.eigh", message="boom")).text == (
        "torch.linalg.eigh raised: boom")
    assert explain(Observation("error", "aten.mm", message="  \n")).text == "aten.mm raised: (no message)"


# --- eigh / svd backward ----------------------------------------------------------------------------------
TIED = {"max_cluster": 3.0, "cluster_value": 0.5, "min_gap": 0.0, "amplification": math.inf}
GAPPED = {"max_cluster": 1.0, "cluster_value": math.nan, "min_gap": 1e-6, "amplification": 1e6}


def test_the_spectral_remedy_names_the_call_the_user_wrote():
    obs = Observation("backward", "aten.div.Tensor", node="LinalgSvdBackward0", function="torch.svd",
                      location="m.py:3", inputs=(summ("values", spectral=TIED),))
    assert "torch.svd at m.py:3 then keeps its forward" in explain(obs).remedies[0]


@pytest.mark.parametrize("output, kind", [(summ("output", inf=2), "inf"), (summ("output", nan=1, inf=1), "NaN")])
def test_a_small_gap_names_what_the_backward_produced(output, kind):
    obs = Observation("backward", "aten.mul.Tensor", node="LinalgEighBackward0", output=output,
                      inputs=(summ("values", spectral=GAPPED),))
    assert explain(obs).text.endswith(f"amplification 1.0e+06): {kind} in eigh backward")


# --- eig backward -----------------------------------------------------------------------------------------
def _eig(spectral=None):
    inputs = (summ("values", dtype="complex64", spectral=spectral),) if spectral else ()
    return explain(Observation("backward", "aten.div.Tensor", node="LinalgEigBackward0", inputs=inputs))


def test_eig_backward_rules():
    near = _eig({"max_cluster": 3.0, "min_gap": 2e-7, "cluster_value": 0.5})
    assert (near.key, near.text) == ("eig_near_tie", "eigenvector gradient of a general eig through nearly tied "
                                     "eigenvalues (cluster of 3 at |lambda| 5.0e-01, smallest |gap| 2.0e-07): the "
                                     "eig backward divides by w_j - w_i")
    assert near.remedies[0].startswith("if the matrix is Hermitian (e.g. a covariance), use torch.linalg.eigh")
    gapped = _eig({"max_cluster": 1.0, "min_gap": 1e-3})
    assert gapped.key == "eig_backward"
    assert gapped.text.startswith("non-finite eigenvector gradient in eig backward (smallest |gap| 1.0e-03): it ")
    assert _eig().text.startswith("non-finite eigenvector gradient in eig backward: it divides")


def test_eig_reads_the_summary_that_holds_the_spectrum():
    first = TensorSummary("self", (3, 3), "complex64", spectral={"log10_cond": 2.0})  # matrix stats, no cluster
    values = summ("values", spectral={"max_cluster": 2.0, "min_gap": 0.0, "cluster_value": 1.0})
    cause = explain(Observation("backward", "aten.div.Tensor", node="LinalgEigBackward0", inputs=(first, values)))
    assert cause.key == "eig_exact_tie" and "cluster of 2" in cause.text


# --- a mask's infinities turned into NaN (the observation carries the mask as context) -------------------
def _masked(op, culprit=None):
    return explain(Observation("forward", op, culprit=culprit, context="the mask values (-inf) were written ..."))


@pytest.mark.parametrize("op, words", [("aten._softmax", "softmax"), ("aten._log_softmax", "log softmax")])
def test_softmax_of_a_masked_row(op, words):
    full = _masked(op, (-math.inf, -math.inf, 3, 3))
    assert (full.key, full.text) == ("masked_row_softmax", f"{words} over a row that is entirely -inf: every key is "
                                     "masked (3 of 3 entries -inf, exp(-inf - -inf) = NaN)")
    hot = _masked(op, (math.inf, -math.inf, 2, 4))
    assert (hot.key, hot.text) == ("masked_softmax_inf", f"{words} over a row holding +inf (inf - inf = NaN)")


@pytest.mark.parametrize("op, name", [("aten.add.Tensor", "add"), ("aten.sub.Tensor", "sub"), ("aten.rsub.Scalar", "rsub")])
def test_masked_values_cancelling(op, name):
    cause = _masked(op, (math.inf, -math.inf))
    assert (cause.key, cause.text) == ("inf_minus_inf", f"inf - inf in {name}: two masked (infinite) values cancel "
                                       "to NaN")
    assert cause.remedies[0].startswith("mask with a large finite negative") and len(cause.remedies) == 2


@pytest.mark.parametrize("name", ["mul", "matmul", "mm", "bmm", "addmm", "baddbmm", "linear", "einsum"])
def test_masked_values_times_zero(name):
    cause = _masked(f"aten.{name}.default", (0.0, math.inf))
    assert (cause.key, cause.text) == ("zero_times_inf", f"0 * inf in {name}: a masked (infinite) value multiplied "
                                       "by 0 gives NaN")
    assert cause.remedies[0].startswith("mask with a large finite negative") and len(cause.remedies) == 2


def test_other_ops_on_a_mask_have_the_generic_mask_sentence():
    cause = _masked("aten.addcmul", (1.0, 0.0, math.inf, 1.0))  # four inputs, but not a row of a softmax
    assert (cause.key, cause.text) == ("mask_to_nan", "addcmul turned the infinite values of a mask into NaN")
    assert cause.remedies[0].startswith("mask with a large finite negative") and len(cause.remedies) == 2


def test_norm_backward_sentence():
    cause = explain(Observation("backward", "aten.div.Tensor", node="LinalgVectorNormBackward0"))
    assert cause.text == "norm backward at the zero vector (0/0)"


# --- log ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("culprit, zeros, key", [
    ((-1.0,), 1, "log_negative"),  # the culprit value decides, whatever zeros the input holds elsewhere
    (None, 1, "log_zero"),  # no culprit: one zero in the argument is enough
    (None, 0, "log_negative"),
])
def test_log_of_zero_or_of_a_negative(culprit, zeros, key):
    assert explain(Observation("forward", "aten.log", culprit=culprit, inputs=(summ(lo=-1.0, zeros=zeros),))).key == key


def test_a_mask_that_reached_the_loss():
    cause = explain(Observation("forward", "aten.masked_fill.Scalar", intentional=True))
    assert (cause.key, cause.text) == ("mask_reached_loss", "the -inf written on purpose by aten.masked_fill.Scalar "
                                       "reached the loss or the gradients unchanged (e.g. a max / logsumexp over a "
                                       "fully masked row)")
    assert explain(Observation("forward", intentional=True)).text.startswith(
        "the -inf written on purpose by a mask reached")


# --- every op the table names, by its sentence ----------------------------------------------------------
@pytest.mark.parametrize("op, culprit, key, text", [
    ("aten.log2", (-1.0,), "log_negative", "log2 of a number below 0 (NaN)"),
    ("aten.log10", (0.0,), "log_zero", "log10 of 0"),
    ("aten.xlogy.Tensor", (1.0, -2.0), "log_negative", "xlogy of a number below 0 (NaN)"),
    ("aten.true_divide.Tensor", (1.0, 0.0), "div_by_zero", "division by 0"),
    ("aten.reciprocal", (0.0,), "div_by_zero", "reciprocal of 0"),
    ("aten.exp2", None, "exp_overflow", "overflow to inf in exp2"),
    ("aten.expm1", None, "exp_overflow", "overflow to inf in expm1"),
    ("aten.sinh", None, "exp_overflow", "overflow to inf in sinh"),
    ("aten.cosh", None, "exp_overflow", "overflow to inf in cosh"),
    ("aten.sqrt", (-1.0,), "sqrt_negative", "sqrt of a negative number (NaN)"),
    ("aten.rsqrt", (0.0,), "rsqrt_zero", "rsqrt of 0 or of a negative number"),
    ("aten.asin", (2.0,), "domain", "asin of a value outside its domain (NaN)"),
    ("aten.atanh", (2.0,), "domain", "atanh of a value outside its domain (NaN)"),
    ("aten.acosh", (0.0,), "domain", "acosh of a value outside its domain (NaN)"),
])
def test_each_named_op_has_its_sentence(op, culprit, key, text):
    cause = explain(Observation("forward", op, culprit=culprit))
    assert (cause.key, cause.text) == (key, text) and cause.remedies
