"""What the locator is handed: the path it names for a non-finite argument however deeply it is nested
(dicts, lists, named tuples, dataclasses, modules reached as the function, its method, an argument or a
closure variable), the additive masks it lets through, and the loss it refuses, in its own words."""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import pytest
import torch
from torch import nn

from ris_stability.locate import Locator, LocatorUsageError, locate_nonfinite

NAN = math.nan


class Pair(NamedTuple):
    clean: torch.Tensor
    bad: torch.Tensor


@dataclasses.dataclass
class Batch:
    ids: list
    pairs: dict


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.lin(x) * self.scale).sum()

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def _nested(value: torch.Tensor) -> Batch:
    return Batch(ids=[1, 2], pairs={"a": [Pair(torch.ones(2), torch.ones(2)), Pair(torch.ones(2), value)]})


def test_a_nested_argument_is_named_by_its_full_path():
    f = locate_nonfinite(lambda batch: batch.pairs["a"][1].bad.sum(), _nested(torch.tensor([1.0, NAN])))
    assert (f.phase, f.location, f.module) == ("input", "batch.pairs['a'][1].bad", "")
    assert f.cause == "argument batch.pairs['a'][1].bad already holds 1 NaN and 0 Inf before the call"


def test_a_tensor_holding_only_minus_inf_is_a_mask_not_a_bad_argument():
    mask = torch.tensor([0.0, -math.inf])
    assert locate_nonfinite(lambda x, m: torch.logsumexp(x + m, 0), torch.ones(2, requires_grad=True), mask) is None
    plus = torch.tensor([0.0, math.inf])
    assert locate_nonfinite(lambda x, m: (x + m).sum(), torch.ones(2), plus).location == "m"


def test_nesting_deeper_than_eight_levels_is_not_searched():
    deep = torch.tensor([NAN])
    for _ in range(9):
        deep = [deep]
    shallow = torch.tensor([NAN])
    for _ in range(8):
        shallow = [shallow]
    assert locate_nonfinite(lambda d: torch.ones(1, requires_grad=True).sum(), shallow).location == "d" + "[0]" * 8
    assert locate_nonfinite(lambda d: torch.ones(1, requires_grad=True).sum(), deep) is None


def test_a_structure_that_holds_itself_is_searched_once():
    loop: dict = {"x": torch.ones(1)}
    loop["self"] = loop
    loop["y"] = torch.tensor([math.inf])
    assert locate_nonfinite(lambda d: d["x"].sum(), loop).location == "d['y']"


@pytest.mark.parametrize("how, location, module", [
    ("module", "lin.weight", "lin"),  # the module called: its parameters under the root ""
    ("method", "lin.weight", "lin"),
    ("argument", "model.lin.weight", "model.lin"),
    ("closure", "head.lin.weight", "head.lin"),
])
def test_a_nan_parameter_is_named_from_the_root_the_locator_found(how, location, module):
    head = Head()
    with torch.no_grad():
        head.lin.weight[0, 0] = NAN
    x = torch.ones(1, 2)
    if how == "module":
        f = locate_nonfinite(head, x)
    elif how == "method":
        f = locate_nonfinite(head.loss, x)
    elif how == "argument":
        f = locate_nonfinite(lambda model, x: model(x), head, x)
    else:
        f = locate_nonfinite(lambda x: head(x), x)
    assert (f.phase, f.location, f.module) == ("input", location, module)


def test_a_nan_buffer_is_found_too():
    head = Head()
    head.scale.fill_(math.inf)
    f = locate_nonfinite(head, torch.ones(1, 2))
    assert (f.location, f.module, f.inputs[0].inf) == ("scale", "", 1)


def test_a_closure_variable_assigned_later_is_skipped():
    def outer():
        def fn(x):
            return (x * late).sum()
        f = locate_nonfinite(fn, torch.ones(2, requires_grad=True))
        late = torch.ones(2)  # noqa: F841  (unassigned while the locator looks at fn's closure)
        return f

    f = outer()  # the locator looks past the empty cell; fn itself then fails on it
    assert f.phase == "error" and "late" in f.message


def test_arguments_of_a_function_without_a_signature_are_named_by_position():
    f = locate_nonfinite(torch.sum, torch.tensor([1.0, NAN]))
    assert (f.phase, f.location) == ("input", "args[0]")
    g = Locator(roots={}).run(torch.sum, torch.ones(2), dtype=torch.float32)
    assert g is None


def test_a_loss_that_needs_no_gradient_is_only_checked_forward():
    assert locate_nonfinite(lambda x: x.sum(), torch.ones(2)) is None
    f = locate_nonfinite(lambda x: torch.log(x).sum(), torch.tensor([-1.0]))
    assert (f.phase, f.op) == ("forward", "aten.log")


def test_gradients_of_every_leaf_are_checked():
    a, b = torch.ones(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    f = locate_nonfinite(lambda a, b: (a * 2).sum() + torch.sqrt(b).sum(), a, b)  # d sqrt/db = inf at 0
    assert (f.phase, f.node, f.message) == ("backward", "SqrtBackward0", "1 of 2 gradients are non-finite")
    g = locate_nonfinite(lambda a, b: (a * 2).sum() + (torch.sqrt(b) * 0).sum(), a, b)  # inf * 0: a NaN node
    assert (g.node, g.message) == ("SqrtBackward0", "backward stopped at SqrtBackward0, the first node to return NaN")


def test_a_loss_that_is_not_a_scalar_tensor_is_refused_with_the_fix():
    with pytest.raises(LocatorUsageError) as wrong_type:
        locate_nonfinite(lambda x: [x.sum()], torch.ones(2))
    assert str(wrong_type.value) == ("locate_nonfinite: fn returned list, expected a scalar loss tensor; wrap fn so "
                                     "that it returns the loss (e.g. lambda: step(batch)['loss'])")
    with pytest.raises(LocatorUsageError) as wrong_shape:
        locate_nonfinite(lambda x: x * 2, torch.ones(2, 3))
    assert str(wrong_shape.value) == ("locate_nonfinite: fn returned a tensor of shape (2, 3), expected a scalar "
                                      "loss; reduce it (e.g. .sum() or .mean()) inside fn")
    assert locate_nonfinite(lambda x: x.sum().reshape(1, 1), torch.ones(2, requires_grad=True)) is None


def test_modules_in_the_closure_after_an_unassigned_cell_are_still_roots():
    head = Head()
    with torch.no_grad():
        head.lin.weight[0, 0] = NAN

    def fn(x):
        return head(x) if x is not None else a_late  # noqa: F821

    f = locate_nonfinite(fn, torch.ones(1, 2))
    assert (f.location, f.module) == ("head.lin.weight", "head.lin")
    a_late = None  # noqa: F841  (assigned after the call: an empty cell of fn's closure, before 'head')
