"""Planted faults in toy modules: the locator must name phase, op/node, module, line and cause."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from ris_stability import Finding, Locator, locate_nonfinite
from ris_stability.locate.finding import TensorSummary, format_finding
from ris_stability.locate import LocatorUsageError

HERE = Path(__file__)


def line_of(marker: str) -> str:
    """'tests/.../test_locate.py:LINE' of the line carrying ``# <marker>``."""
    lines = HERE.read_text().splitlines()
    hits = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(f"# <{marker}>")]
    assert len(hits) == 1, marker
    return f"{HERE.name}:{hits[0]}"


def assert_at(finding: Finding, marker: str) -> None:
    assert finding.location.endswith(line_of(marker)), (finding.location, line_of(marker))


# --- toy modules ------------------------------------------------------------------------------------
class LogHead(nn.Module):
    def forward(self, x):
        return torch.log(x)  # <log>


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = LogHead()

    def forward(self, x):
        return self.head(x).sum()


class Ratio(nn.Module):
    def forward(self, x, shift):
        d = x - shift
        return d / d  # <ratio>


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Ratio()

    def forward(self, x, shift):
        return self.inner(x, shift)


class Deep(nn.Module):
    """The NaN is born in block.inner and then crosses four more ops before the loss."""

    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x, shift):
        r = self.block(x, shift)
        return ((r * 2.0 + 1.0).tanh() ** 2).mean()


class Branch(nn.Module):
    def forward(self, x):
        return torch.log(x).sum()  # <branch>


class Siblings(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Branch()
        self.second = Branch()

    def forward(self, x):
        return self.first(x + 1.0) + self.second(x)


class SqrtNorm(nn.Module):
    def forward(self, v):
        return torch.sqrt((v * v).sum(-1)).sum()  # <sqrt>


class Projector(nn.Module):
    """Shrinkage A = (1 - a) B + a tr(B)/N I, then a projector loss on the top-k eigenvectors."""

    def __init__(self, k: int, alpha: float = 1e-3):
        super().__init__()
        self.k, self.alpha = k, alpha

    def forward(self, B, W):
        n = B.shape[-1]
        tr = B.diagonal(dim1=-2, dim2=-1).real.sum(-1)[..., None, None]
        A = (1 - self.alpha) * B + self.alpha * tr / n * torch.eye(n, dtype=B.dtype, device=B.device)
        _, V = torch.linalg.eigh(A)  # <eigh>
        Vs = V[..., -self.k:]
        return ((Vs @ Vs.mH).real * W).sum()


class Loss(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.subspace = Projector(k)

    def forward(self, B, W):
        return self.subspace(B, W)


def low_rank_psd(batch: int, n: int, rank: int, dtype=torch.complex64, seed: int = 0) -> torch.Tensor:
    """Rank-``rank`` Hermitian PSD matrices with exact zero rows beyond ``rank``, trace n."""
    g = torch.Generator().manual_seed(seed)
    X = torch.zeros(batch, n, rank, dtype=dtype)
    X[:, :rank] = torch.randn(batch, rank, rank, dtype=dtype, generator=g)
    B = X @ X.mH
    return B / B.diagonal(dim1=-2, dim2=-1).real.sum(-1)[..., None, None] * n


# --- forward origins --------------------------------------------------------------------------------
def test_log_of_zero_in_forward():
    f = locate_nonfinite(Net(), torch.tensor([0.0, 1.0, 2.0]))
    assert (f.phase, f.op, f.node, f.module) == ("forward", "aten.log", "", "head")
    assert f.cause == "log of 0"
    assert f.function == "torch.log"
    assert_at(f, "log")
    assert f.inputs[0].zeros == 1 and f.output.inf == 1
    assert "self=0.0" in f.culprit


def test_zero_over_zero_in_forward_division():
    x = torch.tensor([1.0, 2.0, 3.0])
    m = Block()
    f = Locator(roots={"model": m}).run(lambda x, s: m(x, s).sum(), x, torch.tensor([0.0, 2.0, 0.0]))
    assert (f.phase, f.op, f.module) == ("forward", "aten.div.Tensor", "model.inner")
    assert f.cause == "0/0 in division"
    assert_at(f, "ratio")


def test_exp_overflow_in_float32():
    def loss(z):
        return torch.exp(z * 10.0).sum()

    f = locate_nonfinite(loss, torch.tensor([1.0, 9.5]))
    assert (f.phase, f.op, f.module) == ("forward", "aten.exp", "")
    assert f.cause.startswith("overflow to inf in exp")
    assert "88.72" in f.cause  # log(max float32)
    assert f.inputs[0].max == pytest.approx(95.0)


def test_origin_four_ops_before_the_loss_in_nested_module():
    model = Deep()
    f = locate_nonfinite(model, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 0.0]))
    assert (f.phase, f.op, f.module) == ("forward", "aten.div.Tensor", "block.inner")
    assert f.cause == "0/0 in division"
    assert_at(f, "ratio")


def test_fault_in_second_of_two_sibling_submodules():
    f = locate_nonfinite(Siblings(), torch.tensor([0.0, 1.0]))
    assert (f.phase, f.op, f.module, f.cause) == ("forward", "aten.log", "second", "log of 0")
    assert_at(f, "branch")


# --- backward origins -------------------------------------------------------------------------------
def test_sqrt_backward_at_zero_with_finite_forward():
    v = torch.tensor([[0.0, 0.0], [3.0, 4.0]], requires_grad=True)
    f = Locator(roots={"norm": (m := SqrtNorm())}).run(m, v)
    assert (f.phase, f.node, f.op, f.module) == ("backward", "SqrtBackward0", "aten.div.Tensor", "norm")
    assert f.cause.startswith("sqrt backward at 0")
    assert_at(f, "sqrt")
    assert v.grad is None  # the locator computes gradients without touching .grad


def test_eigh_backward_through_exactly_tied_eigenvalues():
    n, rank, k = 24, 4, 2
    B = low_rank_psd(2, n, rank).requires_grad_(True)
    W = torch.rand(n, n, generator=torch.Generator().manual_seed(1))
    loss = Loss(k)
    f = Locator(roots={"loss": loss}).run(loss, B, W)
    assert (f.phase, f.node, f.module) == ("backward", "LinalgEighBackward0", "loss.subspace")
    assert f.op.startswith("aten.div")
    assert f.function == "torch.linalg.eigh"
    assert_at(f, "eigh")
    assert f.cause == ("eigenvector gradient through exactly tied eigenvalues (cluster of 20 at 1.0e-03): "
                       "0/0 in eigh backward")
    spectral = [s.spectral for s in f.inputs if s.spectral]
    assert spectral and spectral[-1]["max_cluster"] == 20 and spectral[-1]["min_gap"] == 0
    assert any("gap_aware" in r for r in f.remedies)
    assert "LinalgEighBackward0" in f.message  # detect_anomaly stopped there


def test_eigh_ties_at_ris_size_name_the_cluster_of_118():
    B = low_rank_psd(2, 144, 26).requires_grad_(True)
    W = torch.rand(144, 144, generator=torch.Generator().manual_seed(2))
    f = Locator(roots={"loss": (loss := Loss(5))}).run(loss, B, W)
    assert f.node == "LinalgEighBackward0"
    assert "cluster of 118 at 1.0e-03" in f.cause


def test_eigh_without_loading_in_complex128_is_clean():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(16, 16, dtype=torch.complex128, generator=g)
    B = (X @ X.mH).requires_grad_(True)
    assert locate_nonfinite(Loss(2), B, torch.ones(16, 16, dtype=torch.float64)) is None


@pytest.mark.parametrize("kind", ["pow", "div"])
def test_pow_and_division_backward_overflow(kind):
    def loss(x, y):
        return (x ** -2.0).sum() if kind == "pow" else (y / x).sum()

    # forward 1e26 and 1e20 are finite in float32; the derivatives 2e39 and 1e40 are not
    x = torch.tensor([1e-13, 1.0], requires_grad=True) if kind == "pow" else torch.tensor([1e-20, 1.0],
                                                                                          requires_grad=True)
    y = torch.ones(2, requires_grad=True)
    f = locate_nonfinite(loss, x, y)
    assert f.phase == "backward"
    if kind == "pow":
        assert f.node == "PowBackward0" and f.cause.startswith("pow backward overflow")
    else:
        assert f.node == "DivBackward0" and f.op == "aten.div.Tensor"
        assert f.cause.startswith("division backward overflow")
    assert f.module == "" and f.output.inf >= 1


def test_masked_log_reports_the_backward_origin():
    def loss(x):
        return torch.where(x > 0, torch.log(x), torch.zeros_like(x)).sum()

    f = locate_nonfinite(loss, torch.tensor([0.0, 2.0], requires_grad=True))
    assert (f.phase, f.node, f.op) == ("backward", "LogBackward0", "aten.div.Tensor")
    assert f.cause.startswith("log backward at 0")


class NaiveEigh(torch.autograd.Function):
    """A custom eigh (like a gap-aware one) whose backward divides by every pair's gap."""

    @staticmethod
    def forward(ctx, A):
        L, V = torch.linalg.eigh(A)  # <custom-forward>
        ctx.save_for_backward(L, V)
        return L, V

    @staticmethod
    def backward(ctx, gL, gV):
        L, V = ctx.saved_tensors
        E = L.unsqueeze(-2) - L.unsqueeze(-1)
        inner = (V.mH @ gV) / E  # <naive-div>
        inner.diagonal(dim1=-2, dim2=-1).copy_(gL)
        return V @ inner @ V.mH


def project_top(A, k):
    _, V = NaiveEigh.apply(A)  # <custom-eigh>
    return V[..., -k:] @ V[..., -k:].mH


class CustomProjector(nn.Module):
    def forward(self, B):
        n = B.shape[-1]
        A = 0.999 * B + 1e-3 * torch.eye(n, dtype=B.dtype)
        return project_top(A, 2).real.sum()  # <custom-caller>


def test_custom_eigh_function_is_recognised_with_its_spectrum():
    B = low_rank_psd(1, 12, 3).requires_grad_(True)
    model = CustomProjector()
    f = locate_nonfinite(lambda B: model(B), B)
    assert (f.phase, f.node, f.function) == ("backward", "NaiveEighBackward", "NaiveEigh.apply")
    assert f.op.startswith("aten.div")
    assert "exactly tied eigenvalues (cluster of 9" in f.cause
    assert f.stack[0].endswith(line_of("custom-forward"))  # torch.linalg.eigh inside the Function
    assert f.stack[1].endswith(line_of("custom-eigh")) and f.stack[2].endswith(line_of("custom-caller"))
    assert f.module == "model"  # the closure variable names the root


# --- bad inputs -------------------------------------------------------------------------------------
@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor


def test_nan_in_an_input_tensor_names_the_argument():
    def step(model, batch):
        return model(batch["x"])

    f = locate_nonfinite(step, Net(), {"x": torch.tensor([1.0, math.nan, math.inf])})
    assert (f.phase, f.op, f.location) == ("input", "", "batch['x']")
    assert f.cause == "argument batch['x'] already holds 1 NaN and 1 Inf before the call"
    f = locate_nonfinite(lambda b: b.x.sum(), Batch(torch.ones(2), torch.tensor([math.nan])))
    assert f.location == "b.y"


def test_nan_in_a_parameter():
    model = Net()
    with torch.no_grad():
        model.lin.weight[0, 0] = math.nan

    def step(model, x):
        return model.lin(x).sum()

    f = locate_nonfinite(step, model, torch.ones(3))
    assert (f.phase, f.location, f.module) == ("input", "model.lin.weight", "model.lin")
    assert "1 NaN" in f.cause


def test_nan_in_a_tensor_that_is_not_an_argument():
    hidden = torch.tensor([math.nan, 1.0])

    def step(x):
        return (x * 2.0 + hidden.exp()).sum()  # <hidden>

    f = locate_nonfinite(step, torch.ones(2))
    assert (f.phase, f.op) == ("input", "aten.exp")
    assert f.cause.startswith("a tensor that was not an argument")
    assert_at(f, "hidden")


# --- raising ops ------------------------------------------------------------------------------------
class Whitener(nn.Module):
    def forward(self, A):
        return torch.linalg.cholesky(A).sum()  # <cholesky>


def test_cholesky_of_a_non_positive_definite_matrix():
    model = nn.Sequential(nn.Identity(), Whitener())
    f = locate_nonfinite(model, torch.tensor([[1.0, 2.0], [2.0, 1.0]], requires_grad=True))
    assert (f.phase, f.op, f.module) == ("error", "aten.linalg_cholesky_ex", "1")
    assert f.cause.startswith("matrix is not positive definite: linalg.cholesky:")
    assert "not positive-definite" in f.message
    assert_at(f, "cholesky")
    assert f.inputs[0].spectral["lambda_min"] == pytest.approx(-1.0)


class PhaseDependent(nn.Module):
    def forward(self, A):
        _, V = torch.linalg.eigh(A)  # <phase>
        return V[..., -1].real.sum()


def test_eigenvector_phase_dependent_loss_raises_in_backward():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 4, dtype=torch.complex64, generator=g)
    A = (X + X.mH).requires_grad_(True)
    f = Locator(roots={"head": (m := PhaseDependent())}).run(m, A)
    assert (f.phase, f.node, f.module) == ("error", "LinalgEighBackward0", "head")
    assert "specified up to multiplication by e^{i phi}" in f.message
    assert f.cause.startswith("the loss depends on the arbitrary phase of complex eigenvectors")
    assert_at(f, "phase")


class Raises(nn.Module):
    def forward(self, x):
        raise ValueError("planted failure")  # <raise>


def test_python_exception_in_a_module_is_an_error_finding():
    f = locate_nonfinite(nn.Sequential(nn.Identity(), Raises()), torch.ones(2))
    assert (f.phase, f.op, f.module) == ("error", "", "1")
    assert "planted failure" in f.cause and f.message == "planted failure"
    assert_at(f, "raise")


# --- clean runs, usage, state -----------------------------------------------------------------------
def test_finite_run_returns_none_and_leaves_grads_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(5, 4)
    expected = model(x).pow(2).mean()
    assert locate_nonfinite(lambda m, x: m(x).pow(2).mean(), model, x) is None
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(x).pow(2).mean(), expected)


def test_non_scalar_loss_is_a_usage_error():
    with pytest.raises(LocatorUsageError, match=r"shape \(3,\)"):
        locate_nonfinite(lambda x: x * 2, torch.ones(3))
    with pytest.raises(LocatorUsageError, match="returned dict"):
        locate_nonfinite(lambda x: {"loss": x.sum()}, torch.ones(3))


def test_closure_modules_name_the_paths():
    net = Net()

    def step(x):
        return net(x)

    assert locate_nonfinite(step, torch.zeros(3)).module == "net.head"


def _global_state():
    from torch.nn.modules import module as M
    return (torch._C._len_torch_function_stack(), torch._C._len_torch_dispatch_stack(),
            torch.is_anomaly_enabled(), len(M._global_forward_pre_hooks), len(M._global_forward_hooks),
            list(warnings.filters))


def test_no_mode_hook_or_anomaly_state_is_left_behind():
    before = _global_state()
    locate_nonfinite(Net(), torch.zeros(3))
    locate_nonfinite(SqrtNorm(), torch.zeros(2, 2, requires_grad=True))
    locate_nonfinite(Whitener(), -torch.eye(2))
    with pytest.raises(LocatorUsageError):
        locate_nonfinite(lambda x: x, torch.ones(2))

    def interrupted(x):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        locate_nonfinite(interrupted, torch.ones(2))
    assert _global_state() == before


def test_user_warnings_still_reach_the_caller():
    def loss(x):
        warnings.warn("from the user's code", UserWarning)
        return x.sum()

    with pytest.warns(UserWarning, match="from the user's code"):
        assert locate_nonfinite(loss, torch.ones(2)) is None


# --- Finding: JSON and text -------------------------------------------------------------------------
def test_finding_round_trips_through_json():
    B = low_rank_psd(1, 12, 3).requires_grad_(True)
    f = Locator(roots={"loss": (loss := Loss(2))}).run(loss, B, torch.ones(12, 12))
    text = json.dumps(f.to_dict(), allow_nan=False)
    back = Finding.from_dict(json.loads(text))
    assert (back.phase, back.node, back.module, back.cause, back.remedies) == (
        f.phase, f.node, f.module, f.cause, f.remedies)
    assert back.inputs[-1].spectral["max_cluster"] == 9
    assert math.isnan(back.inputs[-1].spectral["amplification"])  # inf is written as null
    rendered = format_finding(f)
    assert "LinalgEighBackward0" in rendered and "loss.subspace" in rendered and "cluster of 9" in rendered


def test_finding_rejects_unknown_keys_and_phases():
    from ris_stability.locate.finding import FindingFormatError

    with pytest.raises(FindingFormatError, match="unknown key"):
        Finding.from_dict({"phase": "forward", "cause": "x", "colour": "red"})
    with pytest.raises(FindingFormatError, match="phase"):
        Finding(phase="sideways", cause="x")


def test_tensor_summary_counts():
    s = TensorSummary.of("t", torch.tensor([0.0, -2.0, math.nan, math.inf, 3.0]))
    assert (s.min, s.max, s.absmax, s.nan, s.inf, s.zeros) == (-2.0, 3.0, 3.0, 1, 1, 1)
    c = TensorSummary.of("z", torch.tensor([3 + 4j, 0j]))
    assert (c.max, c.zeros, c.dtype) == (5.0, 1, "complex64")
