"""Gap-aware SVD gradients for losses on one factor only (V alone, U alone, U and S without V): each path of the
backward (spectral/svd.py) against torch's own svd backward on well-separated spectra, and against central
finite differences, in every shape."""
from __future__ import annotations

import pytest
import torch

from ris_stability.spectral import svd_gap_aware, svd_old_gap_aware

from tests.ris_stability.test_spectral_svd import grad_of, rel_err, targets, with_singular_values

SEPARATED = [3.0, 2.0, 1.2, 0.7, 0.4]


def _right_only(u, s, vh, t):
    """A loss on V alone: the right projector onto the top-2 singular vectors against a target."""
    p = vh[..., :2, :].mH @ vh[..., :2, :]
    return (p * t[1]).sum().real


def _left_only(u, s, vh, t):
    p = u[..., :, :2] @ u[..., :, :2].mH
    return (p * t[0]).sum().real


def _left_and_values(u, s, vh, t):
    return _left_only(u, s, vh, t) + s.square().sum()


def _right_and_values(u, s, vh, t):
    return _right_only(u, s, vh, t) + (s[..., 0] * 3).sum()


LOSSES = {"V-only": _right_only, "U-only": _left_only, "U-and-S": _left_and_values, "V-and-S": _right_and_values}


def _case(shape, dtype):
    m, n = shape
    k = min(m, n)
    a = with_singular_values(m, n, SEPARATED[:k], dtype, seed=3)
    return a, targets(m, n, dtype, seed=11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("shape", [(5, 5), (7, 4), (4, 7)], ids=["square", "tall", "wide"])
@pytest.mark.parametrize("full", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("loss", list(LOSSES), ids=list(LOSSES))
def test_one_factor_losses_equal_torch(dtype, shape, full, loss):
    a, t = _case(shape, dtype)
    f = LOSSES[loss]
    mine = grad_of(lambda x: f(*svd_gap_aware(x, full_matrices=full), t), a)
    ref = grad_of(lambda x: f(*torch.linalg.svd(x, full_matrices=full), t), a)
    assert torch.isfinite(mine).all() and float(ref.norm()) > 1e-3
    assert rel_err(mine, ref) < 1e-8


@pytest.mark.parametrize("shape", [(5, 5), (7, 4), (4, 7)], ids=["square", "tall", "wide"])
def test_right_only_loss_matches_central_finite_differences(shape):
    a, t = _case(shape, torch.float64)
    g = grad_of(lambda x: _right_only(*svd_gap_aware(x, full_matrices=False), t), a)
    direction = torch.randn(a.shape, dtype=a.dtype, generator=torch.Generator().manual_seed(5))
    h = 1e-6
    plus = _right_only(*torch.linalg.svd(a + h * direction, full_matrices=False), t)
    minus = _right_only(*torch.linalg.svd(a - h * direction, full_matrices=False), t)
    fd = float((plus - minus) / (2 * h))
    assert float((g * direction).sum()) == pytest.approx(fd, rel=1e-6)


def test_old_spelling_returns_v_and_its_gradient():
    a, t = _case((6, 4), torch.float64)
    u, s, v = svd_old_gap_aware(a)
    ref_u, ref_s, ref_v = torch.svd(a)
    assert torch.equal(s, ref_s) and torch.allclose((u * s) @ v.mH, a, atol=1e-12)
    loss = lambda x, fn: (fn(x)[2][:, :2] @ fn(x)[2][:, :2].mH * t[1]).sum()  # noqa: E731
    mine = grad_of(lambda x: loss(x, svd_old_gap_aware), a)
    ref = grad_of(lambda x: loss(x, torch.svd), a)
    assert rel_err(mine, ref) < 1e-8
    assert torch.equal(svd_old_gap_aware(a, compute_uv=False)[1], torch.svd(a, compute_uv=False)[1])


def test_values_only_loss_equals_torch_in_every_shape():
    for shape in [(5, 5), (7, 4), (4, 7)]:
        a, _ = _case(shape, torch.float64)
        mine = grad_of(lambda x: (svd_gap_aware(x)[1] ** 3).sum(), a)
        ref = grad_of(lambda x: (torch.linalg.svd(x)[1] ** 3).sum(), a)
        assert rel_err(mine, ref) < 1e-10
