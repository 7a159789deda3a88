"""pytest plugin of the mutation runs (``-p tests.mutation.warm``, added by run.py): warms mutmut's fork server.

mutmut forks one child per mutant from a server that has collected the tests. The first optimizer a child built
imported ``torch._dynamo`` (torch.optim's ``__init__`` is wrapped by ``torch._disable_dynamo``, which imports it
lazily): 2-6 s per mutant, for tests that take a tenth of that. Importing it here, and running one optimizer step
and one small eigendecomposition, does that once in the server; every child inherits it through fork.
"""
from __future__ import annotations

import torch
import torch._dynamo  # noqa: F401  (the lazy import every child paid)


def _warm() -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    torch.linalg.eigh(torch.eye(2) + torch.ones(2, 2))


_warm()
