"""finite_screen: one value per tensor, finite exactly when the tensor is (a float32 overflow of a huge but
finite tensor aside, which callers confirm on exact peaks), whatever the tensors' kinds: the fast path for
dense real CPU tensors and the careful path (sparse, complex, float64, mixed kinds) must agree."""
import math

import pytest
import torch

from ris_stability.numerics.norms import finite_screen


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
