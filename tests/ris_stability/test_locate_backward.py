"""Locator: non-finite values born in backward (eigh ties, pow/div overflow, custom Functions) and raising ops."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ris_stability import Locator, locate_nonfinite
from tests.ris_stability.locate_toys import Loss, SqrtNorm, Whitener, assert_at, line_of, low_rank_psd


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
    assert "LinalgEighBackward0" in f.message  # backward stopped there


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


# --- raising ops ------------------------------------------------------------------------------------
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


class _RaisesInBackward(torch.autograd.Function):
    """A backward that raises before it runs any op: no dispatch shows which node is running."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("refused in backward")


class _MasksItsOwnNaN(torch.autograd.Function):
    """A backward that makes 0/0 inside and masks it before it returns (as a gap-aware backward does)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ratio = (x - x) / (x - x)  # NaN everywhere
        return torch.where(torch.isnan(ratio), grad, ratio)


def test_the_node_that_raises_in_backward_is_named_even_before_it_runs_an_op():
    x = torch.ones(3, requires_grad=True)
    f = locate_nonfinite(lambda x: (_RaisesInBackward.apply(x) * 2.0).sum(), x)
    assert (f.phase, f.node) == ("error", "_RaisesInBackwardBackward")  # not MulBackward0, the last with an op
    assert "refused in backward" in f.message


def test_a_nan_masked_inside_its_node_does_not_stop_backward():
    x = torch.ones(3, requires_grad=True)
    assert locate_nonfinite(lambda x: (_MasksItsOwnNaN.apply(x) * 2.0).sum(), x) is None
    g = locate_nonfinite(lambda x: (_MasksItsOwnNaN.apply(x) * 2.0).sum() + torch.sqrt(x - 1.0).sum() * 0.0, x)
    assert (g.phase, g.node, g.message) == (
        "backward", "SqrtBackward0", "backward stopped at SqrtBackward0, the first node to return NaN")
