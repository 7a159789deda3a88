"""finite_screen: one value per tensor, finite exactly when the tensor is (a float32 overflow of a huge but
finite tensor aside, which callers confirm on exact peaks), whatever the tensors' kinds: the fast path for
dense real CPU tensors and the careful path (sparse, complex, float64, mixed kinds) must agree."""
import math

import pytest
import torch

from ris_stability.numerics import norms
from ris_stability.numerics.norms import finite_screen, flat_copy, screen_total


def _cases():
    nan, inf = float("nan"), float("inf")
    yield "float32", [torch.ones(3), torch.tensor([1.0, nan])], [True, False]
    yield "float16", [torch.tensor([1.0, inf], dtype=torch.float16), torch.ones(2, dtype=torch.float16)], [False, True]
    yield "bfloat16", [torch.ones(4, dtype=torch.bfloat16)], [True]
    # float64 is kept wide: 1e150 elements have a finite float64 norm (a float32 one would overflow)
    yield "float64", [torch.full((3,), 1e150, dtype=torch.float64), torch.tensor([nan], dtype=torch.float64)], [True, False]
    yield "mixed 32/64", [torch.ones(2), torch.tensor([inf], dtype=torch.float64)], [True, False]
    yield "complex", [torch.tensor([1 + 1j, complex(nan, 0)]), torch.ones(2, dtype=torch.complex64)], [False, True]
    sparse = torch.sparse_coo_tensor([[0, 2]], torch.tensor([1.0, nan]), (4,))
    yield "sparse", [torch.ones(2), sparse], [True, False]


@pytest.mark.parametrize("name,tensors,finite", list(_cases()), ids=[c[0] for c in _cases()])
def test_the_screen_is_finite_exactly_where_the_tensor_is(name, tensors, finite):
    values = finite_screen(tensors)
    assert values.shape == (len(tensors),) and values.device.type == "cpu"
    assert [math.isfinite(v) for v in values.tolist()] == finite


def test_the_fast_path_gives_the_float32_norms():
    torch.manual_seed(0)
    tensors = [torch.randn(5, 3), torch.randn(7)]
    expected = torch.stack([torch.linalg.vector_norm(t) for t in tensors])
    assert torch.allclose(finite_screen(tensors), expected) and finite_screen(tensors).dtype == torch.float32


@pytest.mark.parametrize("name,tensors,finite", list(_cases()), ids=[c[0] for c in _cases()])
def test_the_total_screen_is_finite_exactly_when_every_tensor_is(name, tensors, finite):
    value = screen_total(tensors)
    assert value.shape == () and math.isfinite(value.item()) == all(finite)


def test_the_flat_copy_holds_every_tensor_in_order():
    tensors = [torch.arange(6.0).reshape(2, 3), torch.tensor([7.0]), torch.arange(4.0).reshape(2, 2).t()]
    flat = flat_copy(tensors)
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in tensors]))
    assert [torch.equal(a, b.reshape(-1)) for a, b in zip(flat.split([6, 1, 4]), tensors)] == [True] * 3


@pytest.mark.parametrize("tensors", [
    [torch.ones(2), torch.ones(2, dtype=torch.float64)],  # mixed dtypes
    [torch.ones(2, dtype=torch.float64)],  # float64: a float32 sum could overflow where its own would not
    [torch.ones(2, dtype=torch.complex64)],
    [torch.sparse_coo_tensor([[0]], torch.tensor([1.0]), (2,))],
    [torch.ones(2), torch.sparse_coo_tensor([[0]], torch.tensor([1.0]), (2,))],  # not the first one
    [torch.ones(2), torch.ones(2, dtype=torch.complex64)],
    [],
], ids=["mixed", "float64", "complex", "sparse", "sparse-later", "complex-later", "empty"])
def test_no_flat_copy_where_the_cheap_screen_does_not_apply(tensors):
    assert flat_copy(tensors) is None


def test_mixed_narrow_dtypes_are_widened_exactly():
    tensors = [torch.tensor([1.5, 65504.0], dtype=torch.float16), torch.tensor([3.0e38]),
               torch.tensor([2.0 ** -133], dtype=torch.bfloat16)]
    flat = flat_copy(tensors)
    assert flat.dtype == torch.float32
    assert flat.tolist() == [x for t in tensors for x in t.float().tolist()]  # each value as its own dtype holds it


def test_no_flat_copy_beyond_its_size_limit(monkeypatch):
    monkeypatch.setattr(norms, "FLAT_SCREEN_MAX", 5)
    assert flat_copy([torch.ones(3), torch.ones(2)]) is not None
    assert flat_copy([torch.ones(3), torch.ones(3)]) is None


def test_half_precision_is_summed_in_float32():
    # 4096 elements of 60000: their float16 sum (2.5e8) overflows float16's 65504, not float32
    values = [torch.full((4096,), 60000.0, dtype=torch.float16)]
    assert math.isfinite(screen_total(values).item())
    assert screen_total(values).dtype == torch.float32


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                    (torch.float64, torch.float32), (torch.complex64, torch.float32)],
                         ids=["float32", "half", "with float64", "with complex"])
def test_fast_norms_are_the_l2_norms_whatever_the_kinds(dtypes):
    torch.manual_seed(0)
    tensors = [torch.randn(4, 3, dtype=d) for d in dtypes]
    got = norms.fast_norms(tensors)
    expected = [torch.linalg.vector_norm(t.to(torch.complex128 if t.is_complex() else torch.float64)) for t in tensors]
    assert [g.dtype for g in got] == [torch.float64 if torch.float64 in dtypes else torch.float32] * len(tensors)
    assert all(torch.allclose(g.double(), e.real, rtol=1e-3) for g, e in zip(got, expected))
