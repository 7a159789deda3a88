"""ReadBack: queued device values of any shape come back flattened, in order, in one host read."""
from __future__ import annotations

import torch

from ris_stability.monitor.readback import ReadBack


def test_values_of_any_shape_come_back_flat_in_queue_order_in_one_read():
    rb, got = ReadBack(), []
    rb.add(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), lambda v: got.append(("matrix", v)))
    rb.add(torch.tensor(5.0, dtype=torch.float64), lambda v: got.append(("scalar", v)))
    rb.add(None, lambda v: got.append(("none", v)))
    rb.add(torch.tensor([6.0, 7.0], dtype=torch.float16), lambda v: got.append(("half", v)))
    rb.read()
    assert got == [("matrix", [1.0, 2.0, 3.0, 4.0]), ("scalar", [5.0]), ("none", []), ("half", [6.0, 7.0])]
    assert rb.reads == 1 and len(rb) == 0


def test_a_tensor_that_requires_grad_is_queued_without_its_graph():
    w = torch.tensor([2.0, 3.0], requires_grad=True)
    rb, got = ReadBack(), []
    rb.add(w * 2, got.extend)
    assert all(not t.requires_grad for t, _ in rb._parts if t is not None)
    rb.read()
    assert got == [4.0, 6.0]


def test_a_function_that_queues_more_is_read_at_the_next_read_point():
    rb, got = ReadBack(), []
    rb.add(torch.tensor([1.0]), lambda v: (got.append(v), rb.add(torch.tensor([[2.0]]), got.append)))
    rb.read()
    assert got == [[1.0]] and len(rb) == 1
    rb.read()
    assert got == [[1.0], [2.0]] and rb.reads == 2
