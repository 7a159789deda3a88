"""Locator behaviour a user reads in the finding: the op blamed when the NaN travels through a view, which
input is shown first when the NaN came from outside, the cause's words, and a finding that survives its JSON
round trip. Small functions, no model."""

from __future__ import annotations

import math

import pytest
import torch

from ris_stability.locate import locate_nonfinite
from ris_stability.locate.finding import Finding

_GLOBAL = torch.tensor([1.0, math.nan, 2.0])  # a tensor no tracked op produced


def _line(marker: str) -> int:
    from pathlib import Path

    text = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(text, 1) if marker in line and "_line(" not in line)


def test_a_view_taken_before_the_nan_is_written_into_its_base_blames_the_writer() -> None:
    def fn(x):
        base = torch.zeros(4)
        head = base[:2]  # a view, taken while base is still finite
        base.copy_(torch.log(x))  # LOG INTO BASE
        return (head * 2).sum()  # the NaN reaches the loss through the view

    f = locate_nonfinite(fn, torch.tensor([-1.0, 2.0, 3.0, 4.0], requires_grad=True))
    assert f.op == "aten.log" and f.phase == "forward"
    assert f.location.endswith(f"test_mut_locate.py:{_line('LOG INTO BASE')}")
    assert f.cause == "log of a number below 0 (NaN)"


def test_a_nan_written_through_a_view_taints_the_base() -> None:
    def fn(x):
        base = torch.ones(4)
        base[1:3] = torch.sqrt(x)  # SQRT INTO VIEW
        return base.sum()

    f = locate_nonfinite(fn, torch.tensor([-4.0, 1.0], requires_grad=True))
    assert f.op == "aten.sqrt" and f.location.endswith(f"test_mut_locate.py:{_line('SQRT INTO VIEW')}")


def test_a_nan_from_outside_shows_the_input_that_brought_it_first() -> None:
    def fn(x):
        return torch.add(x, _GLOBAL).sum()  # GLOBAL ADD

    f = locate_nonfinite(fn, torch.ones(3, requires_grad=True))
    assert f.phase == "input" and f.op == "aten.add.Tensor"
    assert [(i.name, i.nan) for i in f.inputs] == [("other", 1), ("self", 0)]
    assert f.cause == ("a tensor that was not an argument (a global, closure variable or attribute) already held 1 "
                       "NaN and 0 Inf when aten.add.Tensor used it")
    assert f.location.endswith(f"test_mut_locate.py:{_line('GLOBAL ADD')}")


def test_a_nonfinite_argument_is_named_by_its_parameter() -> None:
    def fn(weights, data):
        return (weights * data).sum()

    data = torch.tensor([1.0, math.inf])
    f = locate_nonfinite(fn, torch.ones(2, requires_grad=True), data)
    assert f.phase == "input" and "data" in f.cause and "inf" in f.cause.lower()


@pytest.mark.parametrize("make, op, cause", [
    (lambda x: torch.log(x - 2.0), "aten.log", "log of a number below 0 (NaN)"),
    (lambda x: torch.sqrt(x - 2.0), "aten.sqrt", None),
    (lambda x: 1.0 / (x - 1.0), None, None),
])
def test_common_faults_are_named_by_their_op(make, op, cause) -> None:
    f = locate_nonfinite(lambda x: make(x).sum(), torch.tensor([1.0, 3.0], requires_grad=True))
    assert f is not None and f.phase == "forward"
    if op is not None:
        assert f.op == op
    else:
        assert f.op.startswith(("aten.div", "aten.reciprocal", "aten.mul"))
    if cause is not None:
        assert f.cause == cause


def test_a_clean_function_has_no_finding_and_the_finding_round_trips() -> None:
    assert locate_nonfinite(lambda x: (x * 2).sum(), torch.ones(3, requires_grad=True)) is None
    f = locate_nonfinite(lambda x: torch.log(x).sum(), torch.tensor([-1.0, 1.0], requires_grad=True))
    again = Finding.from_dict(f.to_dict())
    assert again.to_dict() == f.to_dict()
    assert (again.op, again.cause, again.location, again.phase) == (f.op, f.cause, f.location, f.phase)
    assert again.output.nan == f.output.nan == 1 and again.inputs[0].min == -1.0
