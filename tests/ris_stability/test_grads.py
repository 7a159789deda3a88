"""GradMonitor: grad norms against a reference, update ratios, non-finite counts, dead heads and terms."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ris_stability.instruments.grads import GradMonitor, GradMonitorError, module_key


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.angle = nn.Linear(8, 2)
        self.range = nn.Linear(8, 1)
        self.dead = nn.Linear(8, 3)  # planted: never used by the loss


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        self.heads = Heads()
        self.phase = nn.Parameter(torch.randn(3, dtype=torch.complex64))  # a root-level complex parameter

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(x)
        angle = self.heads.angle(h)
        rng = self.heads.range(h)
        return {
            "angle": angle.square().mean() + self.phase.abs().square().sum(),
            "range": rng.abs().mean(),
            "zero": 0.0 * angle.sum(),               # planted: identically zero term
            "const": torch.tensor(1.5),              # planted: constant term (a swallowed exception)
        }


def _step(model: Toy, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    terms = model(torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)))
    sum(terms.values()).backward()
    return terms


def _reference_norm(params: list[nn.Parameter]) -> float:
    flat = [p.grad.reshape(-1).to(torch.complex128) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(flat))) if flat else 0.0


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_module_norms_equal_the_norm_of_the_concatenation(depth):
    torch.manual_seed(0)
    model = Toy()
    _step(model, 1)
    gm = GradMonitor(model, depth=depth)
    gm.observe_grads()
    got = gm.collect()
    named = dict(model.named_parameters())
    for module in gm.modules:
        members = [p for name, p in named.items() if module_key(name, depth) == module]
        assert got[f"grad/{module}"] == pytest.approx(_reference_norm(members), rel=1e-6), module
    assert got["grad/_total"] == pytest.approx(_reference_norm(list(named.values())), rel=1e-6)
    assert not any(key.startswith("grad_nonfinite/") for key in got)
    if depth > 1:  # the planted unused head has no gradient: its norm is exactly 0, not missing or NaN
        assert got["grad/heads.dead"] == 0.0 and got["grad/heads.angle"] > 0.0
    else:  # ... and adds nothing to its parent's norm
        assert got["grad/heads"] == pytest.approx(_reference_norm(list(model.heads.angle.parameters())
                                                                   + list(model.heads.range.parameters())), rel=1e-6)


@pytest.mark.parametrize("name, depth, expected", [
    ("heads.angle.weight", 1, "heads"),
    ("heads.angle.weight", 2, "heads.angle"),
    ("heads.angle.weight", 5, "heads.angle"),
    ("phase", 1, "phase"),
    ("encoder.0.bias", 2, "encoder.0"),
], ids=lambda v: str(v))
def test_module_key(name, depth, expected):
    assert module_key(name, depth) == expected


def test_planted_dead_head_and_constant_terms_are_reported_once_by_name():
    torch.manual_seed(0)
    model = Toy()
    gm = GradMonitor(model, depth=2, dead_after=4)
    for step in range(6):
        terms = _step(model, step)
        gm.observe_grads()
        gm.observe_terms(terms)
        if step < 3:
            assert gm.dead_parameters() == [] and gm.dead_terms() == []
    assert gm.dead_parameters() == ["heads.dead.weight", "heads.dead.bias"]
    assert sorted(gm.dead_terms()) == ["const", "zero"]
    assert gm.dead_parameters() == [] and gm.dead_terms() == []  # reported once
    logged = gm.collect()
    assert logged["loss/const"] == 1.5 and logged["loss/zero"] == 0.0
    assert logged["grad/heads.dead"] == 0.0


def test_a_zero_gradient_counts_as_dead_but_one_nonzero_step_keeps_it_alive():
    lin = nn.Linear(2, 1)
    gm = GradMonitor(lin, dead_after=3)
    for step in range(3):
        lin.weight.grad = torch.zeros_like(lin.weight)
        lin.bias.grad = torch.ones_like(lin.bias) if step == 1 else torch.zeros_like(lin.bias)
        gm.observe_grads()
    assert gm.dead_parameters() == ["weight"]


def test_nonfinite_grad_elements_are_counted_per_module():
    torch.manual_seed(0)
    model = Toy()
    _step(model, 0)
    model.heads.angle.weight.grad[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    gm = GradMonitor(model, depth=1)
    gm.observe_grads()
    got = gm.collect()
    assert got["grad_nonfinite/heads"] == 3 and isinstance(got["grad_nonfinite/heads"], int)
    assert "grad_nonfinite/encoder" not in got
    assert math.isnan(got["grad/heads"]) and math.isnan(got["grad/_total"])
    assert math.isfinite(got["grad/encoder"])


def test_nonfinite_counting_can_be_deferred_to_a_bad_step():
    torch.manual_seed(0)
    model = Toy()
    _step(model, 0)
    model.phase.grad[1] = complex(math.inf, 0.0)
    gm = GradMonitor(model, depth=1)
    gm.observe_grads(count_nonfinite=False)
    first = gm.collect()
    assert math.isinf(first["grad/phase"]) and not any(k.startswith("grad_nonfinite/") for k in first)
    gm.count_nonfinite()
    assert gm.collect() == {"grad_nonfinite/phase": 1}


@pytest.mark.parametrize("outside", [False, True])
def test_update_ratio_and_param_group_norms_match_sgd(outside):
    """``outside``: the second group also holds a parameter that is not the model's (first in the group): the
    per-module ratios take the model's parameters only, each to its own module."""
    torch.manual_seed(0)
    model = Toy()
    lr = 0.1
    extra = [nn.Parameter(torch.randn(6))] if outside else []
    opt = torch.optim.SGD([
        {"params": model.encoder.parameters(), "name": "encoder"},
        {"params": extra + list(model.heads.parameters()) + [model.phase]},
    ], lr=lr)
    _step(model, 3)
    for p in extra:
        p.grad = torch.full_like(p, 50.0)  # a large update of its own: it must not reach any module's ratio
    gm = GradMonitor(model)
    gm.observe_grads(opt)
    before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    gm.before_step(opt)
    opt.step()
    gm.after_step(opt)
    got = gm.collect()
    own = {id(p) for p in model.parameters()}
    for g, key in enumerate(["encoder", "1"]):
        group = opt.param_groups[g]["params"]
        grad_norm = _reference_norm(group)
        theta = float(torch.linalg.vector_norm(torch.cat([p.reshape(-1).to(torch.complex128) for p in before[g]])))
        # the group's gradient norm is over the model's parameters in it; its update ratio over the whole group
        assert got[f"grad_group/{key}"] == pytest.approx(_reference_norm([p for p in group if id(p) in own]), rel=1e-6)
        assert got[f"update_ratio_group/{key}"] == pytest.approx(lr * grad_norm / theta, rel=1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    start = {names[id(p)]: b for snap, grp in zip(before, opt.param_groups) for b, p in zip(snap, grp["params"])
             if id(p) in names}
    assert len(gm.modules) == 3
    for module in gm.modules:  # per module, as the grad norms: the module's own parameters
        mine = [n for n in start if module_key(n, 1) == module]
        theta = float(torch.linalg.vector_norm(torch.cat([start[n].reshape(-1).to(torch.complex128) for n in mine])))
        params = [p for n, p in model.named_parameters() if n in mine]
        assert got[f"update_ratio/{module}"] == pytest.approx(lr * _reference_norm(params) / theta, rel=1e-5), module
    assert gm.collect() == {}  # cleared after collect


def test_after_step_without_snapshot_is_an_error():
    lin = nn.Linear(2, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(GradMonitorError, match="before_step"):
        GradMonitor(lin).after_step(opt)


def test_model_without_trainable_parameters_is_an_error():
    frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(GradMonitorError, match="no trainable parameters"):
        GradMonitor(frozen)


def test_huge_finite_gradient_is_finite_and_measured_exactly():
    """Norms are accumulated in float32 first; a float32 overflow of finite elements (~1e30 here, whose
    squares exceed float32's range) is re-measured in float64, so it is neither non-finite nor inf."""
    model = nn.Linear(3, 2)
    gm = GradMonitor(model)
    model.weight.grad = torch.full((2, 3), 1e30)
    model.bias.grad = torch.zeros(2)
    gm.observe_grads()
    assert gm.grads_finite() is True
    assert gm.collect()["grad/_total"] == pytest.approx(1e30 * math.sqrt(6), rel=1e-6)
    model.weight.grad[0, 0] = math.inf
    gm.observe_grads()
    assert gm.grads_finite() is False and gm.collect()["grad/_total"] == math.inf
    model.weight.grad = torch.full((2, 3), 2.0)
    gm.observe_grads()
    assert gm.grads_finite() is True and not gm._exact  # no overflow: the float32 pass is the answer
    assert gm.collect()["grad/_total"] == pytest.approx(2 * math.sqrt(6), rel=1e-7)
