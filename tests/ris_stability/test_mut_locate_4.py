"""The locator's verdict in runs a user might write: which op is blamed when an op raises after a
linear-algebra op, and what an input finding shows (the argument's path, its counts, the remedies)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ris_stability.locate import locate_nonfinite


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
