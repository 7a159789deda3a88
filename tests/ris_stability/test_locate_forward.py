"""Locator: non-finite values born in forward, and non-finite inputs before the call."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from ris_stability import Locator, locate_nonfinite
from tests.ris_stability.locate_toys import Block, Deep, Net, Siblings, assert_at


# --- forward origins --------------------------------------------------------------------------------
def test_log_of_zero_in_forward():
    f = locate_nonfinite(Net(), torch.tensor([0.0, 1.0, 2.0]))
    assert (f.phase, f.op, f.node, f.module) == ("forward", "aten.log", "", "head")
    assert f.cause == "log of 0"
    assert f.function == "torch.log"
    assert_at(f, "log")
    assert f.inputs[0].zeros == 1 and f.output.inf == 1
    assert "self=0.0" in f.culprit


def test_zero_over_zero_in_forward_division():
    x = torch.tensor([1.0, 2.0, 3.0])
    m = Block()
    f = Locator(roots={"model": m}).run(lambda x, s: m(x, s).sum(), x, torch.tensor([0.0, 2.0, 0.0]))
    assert (f.phase, f.op, f.module) == ("forward", "aten.div.Tensor", "model.inner")
    assert f.cause == "0/0 in division"
    assert_at(f, "ratio")


def test_exp_overflow_in_float32():
    def loss(z):
        return torch.exp(z * 10.0).sum()

    f = locate_nonfinite(loss, torch.tensor([1.0, 9.5]))
    assert (f.phase, f.op, f.module) == ("forward", "aten.exp", "")
    assert f.cause.startswith("overflow to inf in exp")
    assert "88.72" in f.cause  # log(max float32)
    assert f.inputs[0].max == pytest.approx(95.0)


def test_origin_four_ops_before_the_loss_in_nested_module():
    model = Deep()
    f = locate_nonfinite(model, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 0.0]))
    assert (f.phase, f.op, f.module) == ("forward", "aten.div.Tensor", "block.inner")
    assert f.cause == "0/0 in division"
    assert_at(f, "ratio")


def test_fault_in_second_of_two_sibling_submodules():
    f = locate_nonfinite(Siblings(), torch.tensor([0.0, 1.0]))
    assert (f.phase, f.op, f.module, f.cause) == ("forward", "aten.log", "second", "log of 0")
    assert_at(f, "branch")


# --- bad inputs -------------------------------------------------------------------------------------
@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor


def test_nan_in_an_input_tensor_names_the_argument():
    def step(model, batch):
        return model(batch["x"])

    f = locate_nonfinite(step, Net(), {"x": torch.tensor([1.0, math.nan, math.inf])})
    assert (f.phase, f.op, f.location) == ("input", "", "batch['x']")
    assert f.cause == "argument batch['x'] already holds 1 NaN and 1 Inf before the call"
    f = locate_nonfinite(lambda b: b.x.sum(), Batch(torch.ones(2), torch.tensor([math.nan])))
    assert f.location == "b.y"


def test_nan_in_a_parameter():
    model = Net()
    with torch.no_grad():
        model.lin.weight[0, 0] = math.nan

    def step(model, x):
        return model.lin(x).sum()

    f = locate_nonfinite(step, model, torch.ones(3))
    assert (f.phase, f.location, f.module) == ("input", "model.lin.weight", "model.lin")
    assert "1 NaN" in f.cause


def test_nan_in_a_tensor_that_is_not_an_argument():
    hidden = torch.tensor([math.nan, 1.0])

    def step(x):
        return (x * 2.0 + hidden.exp()).sum()  # <hidden>

    f = locate_nonfinite(step, torch.ones(2))
    assert (f.phase, f.op) == ("input", "aten.exp")
    assert f.cause.startswith("a tensor that was not an argument")
    assert_at(f, "hidden")


def test_a_non_finite_tensor_copied_first_is_named_at_the_copy():
    # Copies of values already checked finite are not checked again; a copy of a tensor never checked is.
    hidden = torch.tensor([math.nan, 1.0])

    def step(x):
        return (x * 2.0 + hidden.clone().exp()).sum()

    f = locate_nonfinite(step, torch.ones(2))
    assert (f.phase, f.op) == ("input", "aten.clone")
    f = locate_nonfinite(lambda x: torch.cat([x * 2.0, hidden]).exp().sum(), torch.ones(2))
    assert (f.phase, f.op) == ("input", "aten.cat")


def test_a_value_written_non_finite_after_its_check_is_named_at_the_write():
    def step(x):
        y = x * 2.0  # checked finite here
        y[0] = math.nan  # <write>
        return y.clone().exp().sum()  # the copy carries the write's origin

    f = locate_nonfinite(step, torch.ones(3))
    assert (f.phase, f.op) == ("input", "aten.copy_")  # the NaN scalar arrives as a tensor copied in
    assert_at(f, "write")
