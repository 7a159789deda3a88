"""The locator's verdict in runs a user might write: which op is blamed when an op raises after a
linear-algebra op, and what an input finding shows (the argument's path, its counts, the remedies)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ris_stability.locate import locate_nonfinite
from ris_stability.locate.masks import row_culprit


def test_an_op_raising_after_a_linalg_op_is_blamed_itself():
    def fn(x):
        y = torch.linalg.inv(x)  # finite, and the last linear-algebra op before the failure
        return torch.mm(y, torch.ones(2, 2)).sum()  # 3x3 @ 2x2: raises

    f = locate_nonfinite(fn, torch.eye(3, requires_grad=True))
    assert f.phase == "error" and f.op == "aten.mm"
    assert f.cause.startswith("aten.mm raised: ")


def test_a_nan_parameter_of_the_module_called_is_named_by_its_path():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        net[1].weight[0, 1] = math.nan
    f = locate_nonfinite(net, torch.ones(1, 2))
    assert (f.phase, f.location, f.module) == ("input", "1.weight", "1")  # no leading "." for the root ""
    assert (f.inputs[0].name, f.inputs[0].nan, f.inputs[0].shape) == ("1.weight", 1, (1, 2))
    assert f.cause == "argument 1.weight already holds 1 NaN and 0 Inf before the call"
    assert f.remedies and "nan_to_num" in f.remedies[-1]


def test_an_op_raising_on_a_nan_blames_the_origin_of_that_nan_not_the_first_one():
    def fn(x):
        unrelated = torch.log(x[:1] - 5.0)  # the run's first NaN: not what eig is given
        m = torch.sqrt(x[1:] - 5.0).reshape(2, 2)  # SQRT: the NaN eig is given
        return torch.linalg.eig(m)[0].real.sum() + unrelated.sum()

    f = locate_nonfinite(fn, torch.ones(5, requires_grad=True))
    assert (f.phase, f.op) == ("forward", "aten.sqrt")
    assert "later raised on this non-finite value: torch.linalg.eig: input tensor should not contain infs or NaNs" \
        in f.message


def test_a_nan_that_left_the_taint_map_is_blamed_on_the_runs_first_origin():
    def fn(x):
        y = torch.log(x - 2.0)  # LOG
        m = torch.from_numpy(y.detach().numpy().copy()).reshape(2, 2)  # through numpy: no op of torch's
        return torch.linalg.eig(m)[0].real.sum()

    f = locate_nonfinite(fn, torch.ones(4, requires_grad=True))
    assert (f.phase, f.op) == ("forward", "aten.log") and "later raised" in f.message


def test_row_culprit_needs_the_row_dimension():
    bad = torch.full((2, 3), math.nan)
    assert row_culprit("_softmax", (torch.zeros(2, 3),), bad) == (None, "")  # no dim: no row to show
    assert row_culprit("relu", (torch.zeros(2, 3), 1), bad) == (None, "")  # not a row op


def test_eig_through_a_tie_reports_the_spectrum_of_its_forward():
    d = nn.Parameter(torch.tensor([1.0, 1.0, 2.0]))

    def fn():
        w, v = torch.linalg.eig(torch.diag(d))
        return (v.abs() ** 2)[0].sum() + w.real.sum()

    f = locate_nonfinite(fn)
    assert (f.phase, f.node) == ("backward", "LinalgEigBackward0")
    assert f.cause == ("eigenvector gradient of a general eig through exactly tied eigenvalues (cluster of 2 at "
                       "|lambda| 1.0e+00, smallest |gap| 0.0e+00): the eig backward divides by w_j - w_i")
    values = f.inputs[-1]
    assert values.name == "eig values of the forward torch.linalg.eig"
    assert values.spectral == {"min_gap": 0.0, "amplification": math.inf, "max_cluster": 2.0, "cluster_value": 1.0,
                               "lambda_max": 2.0, "n": 3.0}


def test_ops_that_are_neither_elementwise_nor_row_ops_show_no_culprit():
    f = locate_nonfinite(lambda x: torch.mm(x, x).sum(), torch.full((2, 2), 1e30, requires_grad=True))
    assert (f.op, f.cause, f.culprit) == ("aten.mm", "overflow to inf in mm", "")
    # a row op that overflowed to -inf without any NaN: no row is to blame either
    f = locate_nonfinite(lambda x: torch.log_softmax(x, -1).sum(), torch.tensor([3e38, -3e38], requires_grad=True))
    assert (f.op, f.culprit) == ("aten._log_softmax", "")
    assert f.cause == "non-finite output (inf) of aten._log_softmax from finite inputs"


_INF = math.inf


def test_row_culprit_finds_the_row_along_the_dimension_it_is_given():
    x = torch.tensor([[0.0, -_INF, -_INF], [-_INF, -_INF, -_INF]])
    bad = torch.softmax(x, 1)
    expected = ((-_INF, -_INF, 3, 3), "row (1, :) of the input: all 3 entries are -inf -> NaN")
    for dim in (1, -1, [1]):
        assert row_culprit("_softmax", (x, dim, False), bad) == expected
    assert row_culprit("_softmax", (x, 1), bad) == expected  # the dim is all it needs
    assert row_culprit("_softmax", (x, (0, 1), False), bad) == (None, "")  # several dims: no single row
    assert row_culprit("_softmax", (x, 1, False), bad[:1]) == (None, "")  # output of another shape
    assert row_culprit("_softmax", (), bad) == (None, "")


def test_row_culprit_describes_the_first_nan_row():
    x = torch.tensor([[-_INF, -_INF], [-_INF, -_INF], [-_INF, _INF]])  # both columns make NaN along dim 0
    assert row_culprit("_softmax", (x, 0, False), torch.softmax(x, 0))[1] == (
        "row (:, 0) of the input: all 3 entries are -inf -> NaN")


def test_an_in_place_op_is_the_origin_and_shows_the_values_it_destroyed():
    def fn(x):
        y = x * 1.0
        y.log_()  # the input before the op: -1.0; after it: NaN
        return y.sum()

    f = locate_nonfinite(fn, torch.tensor([-1.0, 2.0], requires_grad=True))
    assert (f.phase, f.op) == ("forward", "aten.log_")
    assert (f.inputs[0].name, f.inputs[0].min, f.inputs[0].nan) == ("self", -1.0, 0)
    assert f.culprit == "at index (0,): self=-1.0 -> nan"
    assert f.cause == "log of a number below 0 (NaN)"


def test_huge_finite_values_whose_sum_overflows_are_not_an_origin():
    assert locate_nonfinite(lambda x: (x * 1.0).amax(), torch.tensor([3e38, 3e38], requires_grad=True)) is None
    z = torch.tensor([3e38 + 0j, 3e38 + 0j], requires_grad=True)
    assert locate_nonfinite(lambda z: (z * 1.0).abs().amax(), z) is None


def test_a_backward_raise_names_the_forward_op_and_function_of_its_node():
    torch.manual_seed(0)
    x = torch.randn(4, 4, dtype=torch.complex64)
    a = (x + x.mH).requires_grad_(True)
    f = locate_nonfinite(lambda a: torch.linalg.eigh(a)[1][..., -1].real.sum(), a)
    assert (f.phase, f.node, f.function) == ("error", "LinalgEighBackward0", "torch.linalg.eigh")
    assert f.op == "aten._linalg_eigh"
    assert f.inputs[0].name == "eigh values of the forward torch.linalg.eigh" and f.inputs[0].spectral["n"] == 4


def test_the_forward_function_is_named_with_the_op():
    f = locate_nonfinite(lambda x: torch.sqrt(x).sum(), torch.tensor([-1.0], requires_grad=True))
    assert (f.op, f.function, f.cause) == ("aten.sqrt", "torch.sqrt", "sqrt of a negative number (NaN)")
    g = locate_nonfinite(lambda x: (x.sqrt() * 2).sum(), torch.tensor([-1.0], requires_grad=True))
    assert (g.op, g.function) == ("aten.sqrt", "torch.Tensor.sqrt")


def test_describe_names_only_the_parts_of_the_place_it_knows():
    from ris_stability.locate.masks import describe

    by = "the mask values (-inf) were written on purpose by aten.fill_"
    assert describe("aten.fill_", "", "", "", False) == by
    assert describe("aten.fill_", "torch.full", "", "", False) == by + " (torch.full)"
    assert describe("aten.fill_", "", "m.py:3", "", False) == by + " at m.py:3"
    assert describe("aten.fill_", "", "", "enc.attn", False) == by + " in enc.attn"


_OUTSIDE = torch.tensor([1.0, math.nan, 2.0, 3.0])  # no op of the run made it


def test_a_slice_of_an_outside_nan_is_not_blamed_the_op_using_it_is():
    f = locate_nonfinite(lambda x: torch.add(x, _OUTSIDE[1:]).sum(), torch.ones(3, requires_grad=True))
    assert (f.phase, f.op) == ("input", "aten.add.Tensor")
    assert f.cause.endswith("already held 1 NaN and 0 Inf when aten.add.Tensor used it")


def test_xlogy_is_judged_by_the_argument_of_its_log():
    """xlogy(x, y) = x * log(y): log(0) there is -inf, not the NaN of a negative argument (a bug: x was read)."""
    f = locate_nonfinite(lambda y: torch.xlogy(torch.ones(2), y).sum(), torch.tensor([0.0, 1.0], requires_grad=True))
    assert (f.op, f.cause) == ("aten.xlogy.Tensor", "xlogy of 0")
    g = locate_nonfinite(lambda y: torch.xlogy(torch.ones(2), y).sum(), torch.tensor([-1.0, 1.0], requires_grad=True))
    assert g.cause == "xlogy of a number below 0 (NaN)"
