"""Finite means finite (huge but finite gradients are never called non-finite, by the monitor or the
locator) and origin before symptom (an op that raises on an already non-finite input is context, the
finding is where the value first went non-finite)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ris_stability.instruments.grads import grad_norms
from ris_stability.numerics.norms import float64_norms
from ris_stability.locate import Locator
from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.records import read_trace

from tests.ris_stability.eig_models import ConvEig


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).sum()


def test_float64_norms_do_not_overflow_where_float32_does():
    g = torch.full((64,), 1.7e19)
    assert math.isinf(float(torch.linalg.vector_norm(g)))  # the float32 norm the old check used
    (norm,) = float64_norms([g])
    assert norm.dtype == torch.float64 and math.isclose(float(norm), 1.7e19 * 8, rel_tol=1e-6)
    z = torch.full((4,), 3e30 + 4e30j, dtype=torch.complex64)
    assert math.isclose(float(float64_norms([z])[0]), 1e31, rel_tol=1e-6)


def test_grad_norms_keep_nonfinite_apart_from_huge():
    p, q = nn.Parameter(torch.zeros(64)), nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.full((64,), 1.7e19), torch.tensor([1.0, math.inf])
    norms = grad_norms([p, q], torch.device("cpu"))
    assert math.isfinite(float(norms[0])) and math.isinf(float(norms[1]))


def test_huge_finite_sgd_run_is_never_nonfinite(tmp_path):
    torch.manual_seed(0)
    model = Wide()
    opt = torch.optim.SGD(model.parameters(), lr=1e-21)
    x = torch.full((8, 64), 1.7e19)
    monitor = StabilityMonitor(tmp_path / "run", MonitorConfig(policy="observe"))
    with MonitorSession(monitor, model, opt) as s:
        for step in range(4):
            opt.zero_grad(set_to_none=True)
            s.start_step(step, batch={"x": x})
            loss = model(x)
            s.after_forward(loss)
            loss.backward()
            assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
            assert float(torch.linalg.vector_norm(model.lin.weight.grad)) == math.inf  # float32 overflows
            if s.after_backward():
                opt.step()
            s.end_step()
    assert monitor.nonfinite_steps == []
    trace = read_trace(tmp_path / "run")
    assert not [e for e in trace.events if e["kind"].startswith("nonfinite")]
    assert trace.steps["grad/_total"].between(1e20, 1e30).all()
    # The locator agrees: the same step is finite.
    assert Locator(roots={"model": model}).run(model, x) is None


def test_forward_overflow_that_makes_eig_raise_is_reported_at_the_overflow():
    model = ConvEig()
    x = torch.rand(2, 1, 8) * 1e38 + 1e38
    finding = Locator(roots={"model": model}).run(model, x)
    assert finding is not None
    assert (finding.phase, finding.op, finding.module) == ("forward", "aten.convolution", "model.conv")
    assert "overflow" in finding.cause
    assert "linalg_eig" in finding.message and "raised" in finding.message


def test_eig_raising_on_healthy_input_is_still_the_finding():
    class Bad(nn.Module):
        def forward(self, A: torch.Tensor) -> torch.Tensor:
            return torch.linalg.cholesky(A).sum()
    finding = Locator(roots={"model": Bad()}).run(Bad(), -torch.eye(3))
    assert finding is not None and finding.phase == "error" and "positive" in finding.cause


def test_uninitialised_memory_is_not_an_origin():
    from ris_stability.locate.locator import _Session
    from ris_stability.observe.tracker import ModuleTracker
    session = _Session(ModuleTracker({}))
    garbage = torch.tensor([math.nan, 1.0])  # what empty_like may hand out
    session._check(torch.ops.aten.empty_like.default, (torch.ones(2),), {}, garbage, {}, {})
    assert session.origins == [] and session.taint.get(garbage) is None
    session._check(torch.ops.aten.log.default, (torch.tensor([0.0, 1.0]),), {}, torch.tensor([-math.inf, 0.0]),
                   {}, {})
    assert [o.op for o in session.origins] == ["aten.log"]
