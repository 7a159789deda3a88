"""What a finding says about a tensor and about the function that made it: the summary of empty, integer,
boolean, float and complex tensors (the numbers printed under "inputs" and "output"), the name of a torch
function, of the user's own function and of an unhashable callable, and a finding built from lists keeps
them as its tuples (it compares equal to the same finding built from tuples)."""

from __future__ import annotations

import math

import torch

from ris_stability.locate.finding import Finding, TensorSummary
from ris_stability.locate.nodes import _name_of


def test_an_empty_tensor_is_summarised_by_name_shape_dtype_and_its_spectral_notes() -> None:
    s = TensorSummary.of("w", torch.zeros(0, 3), spectral={"min_gap": 0.5})
    assert (s.name, s.shape, s.dtype, s.spectral) == ("w", (0, 3), "float32", {"min_gap": 0.5})
    assert (s.min, s.max, s.absmax, s.nan, s.inf, s.zeros) == (None, None, None, 0, 0, 0)
    assert TensorSummary.of("e", torch.zeros(0, dtype=torch.int64)).spectral == {}


def test_a_float_tensor_counts_its_nan_inf_and_zeros_and_ranges_its_finite_values() -> None:
    t = torch.tensor([[-3.0, 0.0, math.nan], [math.inf, 2.0, 0.0]], dtype=torch.float64)
    s = TensorSummary.of("x", t)
    assert (s.shape, s.dtype, s.nan, s.inf, s.zeros) == ((2, 3), "float64", 1, 1, 2)
    assert (s.min, s.max, s.absmax) == (-3.0, 2.0, 3.0)


def test_integer_boolean_and_complex_tensors_are_ranged_too() -> None:
    i = TensorSummary.of("i", torch.tensor([-4, 0, 7]))
    assert (i.dtype, i.min, i.max, i.absmax, i.nan, i.inf, i.zeros) == ("int64", -4.0, 7.0, 7.0, 0, 0, 1)
    b = TensorSummary.of("b", torch.tensor([True, False, True]))
    assert (b.dtype, b.min, b.max, b.zeros, b.nan, b.inf) == ("uint8", 0.0, 1.0, 1, 0, 0)
    c = TensorSummary.of("c", torch.tensor([3 + 4j, 0j, complex(math.nan, 0)], dtype=torch.complex64))
    assert (c.dtype, c.min, c.max, c.absmax, c.nan, c.zeros) == ("complex64", 0.0, 5.0, 5.0, 1, 1)


def _double(x):
    return 2 * x


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]
    __name__ = "unhashable_op"

    def __call__(self, x):
        return x


def test_functions_are_named_as_torch_names_them_or_by_their_own_name() -> None:
    assert _name_of(torch.log) == "torch.log" and _name_of(torch.log) == "torch.log"  # cached: the same
    assert _name_of(torch.Tensor.add) == "torch.Tensor.add"
    assert _name_of(_double) == "_double" and _name_of(_double) == "_double"
    assert _name_of(_Unhashable()) == "unhashable_op"
    assert _name_of(object()) == ""


def test_a_finding_built_from_lists_holds_tuples() -> None:
    x = TensorSummary.of("x", torch.ones(2))
    f = Finding(phase="forward", cause="log of 0", op="aten.log", inputs=[x], remedies=["clamp"], stack=["a.py:1"])
    assert f.inputs == (x,) and f.remedies == ("clamp",) and f.stack == ("a.py:1",)
    assert f == Finding(phase="forward", cause="log of 0", op="aten.log", inputs=(x,), remedies=("clamp",),
                        stack=("a.py:1",))


def test_the_inputs_of_an_op_that_takes_lists_are_named_by_position() -> None:
    """A foreach op overflowing from finite inputs: its list arguments are named self[0], self[1], other[0], ..."""
    from ris_stability.locate import locate_nonfinite

    def fn(a, b):
        return torch._foreach_mul([a, a], [b, b])[1].sum()

    f = locate_nonfinite(fn, torch.full((2,), 3e38), torch.full((2,), 3e38))
    assert f.op == "aten._foreach_mul.List" and f.phase == "forward"
    assert [s.name for s in f.inputs] == ["self[0]", "self[1]", "other[0]", "other[1]"]
    assert f.cause == "non-finite output (inf) of aten._foreach_mul.List from finite inputs"
