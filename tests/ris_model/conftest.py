"""Shared fixtures of the pipeline tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batched 144 x 144 eigensolves under MKL threads slow down 10-100x when the cores are shared (the
    spinning threads fight other processes); one thread is stable and as fast at these sizes."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
