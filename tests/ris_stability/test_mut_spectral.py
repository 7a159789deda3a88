"""Gap-aware SVD gradients for losses on one factor only (V alone, U alone, U and S without V): each path of the
backward (spectral/svd.py) against torch's own svd backward on well-separated spectra, and against central
finite differences, in every shape."""
from __future__ import annotations

import pytest
import torch

from ris_stability.spectral import svd_gap_aware, svd_old_gap_aware, tie_rtol

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


# ----------------------------------------------------------------------------- the rule, by hand, on 2 x 2
def _lorentz(x: float, w: float) -> float:
    return x / (x * x + w * w)


def _grad(fn, a, loss):
    leaf = a.clone().requires_grad_()
    loss(*fn(leaf)).backward()
    return leaf.grad


def _left_pair(u, s, vh):
    """U_00 U_10: the rotation of the top left singular vector towards the second (sign-invariant)."""
    return u[..., 0, 0] * u[..., 1, 0]


def _right_pair(u, s, vh):
    return vh[..., 0, 0] * vh[..., 0, 1]


@pytest.mark.parametrize("eps", [None, 0.0, 1e-2, 0.3])
def test_near_pair_gradient_is_the_lorentzian_of_the_gap_and_the_sum(eps):
    """A = c diag(1, 1 - d): dL/dA for a loss on U (on V) is 1/2 [F(d) +- F(2 - d)] / c off the diagonal, F the
    Lorentzian x / (x^2 + w^2) of the relative gap and of the relative sum with the width the user passed."""
    c, d = 2.0, 1e-3
    a = torch.diag(torch.tensor([c, c * (1 - d)], dtype=torch.float64))
    w = tie_rtol(2, torch.float64) if eps is None else eps
    gap, total = _lorentz(d, w) / (2 * c), _lorentz(2 - d, w) / (2 * c)
    fn = lambda x: svd_gap_aware(x, eps=eps)  # noqa: E731
    left, right = _grad(fn, a, _left_pair), _grad(fn, a, _right_pair)
    rel = 64 * torch.finfo(torch.float64).eps
    assert left[1, 0].item() == pytest.approx(gap + total, rel=rel)
    assert left[0, 1].item() == pytest.approx(gap - total, rel=rel)
    assert torch.equal(right, left.mT) and left[0, 0] == 0 and left[1, 1] == 0
    both = _grad(fn, a, lambda u, s, vh: _left_pair(u, s, vh) + 3 * _right_pair(u, s, vh))
    assert torch.allclose(both, left + 3 * right, rtol=rel, atol=0)
    if eps is None:  # the default width is the tie threshold: torch's own gradient on a resolved gap
        assert torch.allclose(left, _grad(torch.linalg.svd, a, _left_pair), rtol=1e-12, atol=0)


def test_a_tied_pair_keeps_only_its_sum_term():
    """d = 0: the gap term of a tied pair is dropped (0, not 0/0), the sum term 1 / (2 s) stays."""
    a = torch.diag(torch.tensor([1.5, 1.5], dtype=torch.float64))
    left = _grad(svd_gap_aware, a, _left_pair)
    assert torch.isfinite(left).all() and torch.isnan(_grad(torch.linalg.svd, a, _left_pair)).any()
    total = _lorentz(2.0, tie_rtol(2, torch.float64)) / (2 * 1.5)
    assert left[1, 0].item() == pytest.approx(total, rel=1e-14) and left[0, 1].item() == pytest.approx(-total, rel=1e-14)


@pytest.mark.parametrize("eps", [None, 0.5])
@pytest.mark.parametrize("wide", [False, True], ids=["tall", "wide"])
def test_complement_term_of_a_rectangular_factor_is_the_lorentzian_of_s(eps, wide):
    """Tall A = c [e0 (1), e1 (1 - d); 0]: turning u_0 towards the third axis e2 costs 1 / s_0, broadened to
    s / (s^2 + w^2) like every other 1/x of the rule (and the same for v_0 of the wide transpose)."""
    c, d = 2.0, 1e-3
    a = torch.tensor([[c, 0.0], [0.0, c * (1 - d)], [0.0, 0.0]], dtype=torch.float64)
    w = tie_rtol(3, torch.float64) if eps is None else eps
    fn = lambda x: svd_gap_aware(x, full_matrices=False, eps=eps)  # noqa: E731
    if wide:
        grad = _grad(fn, a.mT.contiguous(), lambda u, s, vh: vh[0, 0] * vh[0, 2]).mT
    else:
        grad = _grad(fn, a, lambda u, s, vh: u[0, 0] * u[2, 0])
    expected = torch.zeros(3, 2, dtype=torch.float64)
    expected[2, 0] = _lorentz(1.0, w) / c
    assert torch.allclose(grad, expected, rtol=1e-14, atol=0)


def test_singular_value_losses_get_torchs_gradient_bit_for_bit():
    """A loss on S alone takes torch's own formula (no pair terms), in every shape, real, complex and single."""
    for dtype in (torch.float32, torch.float64, torch.complex128):
        for shape in [(5, 5), (7, 4), (4, 7)]:
            a = torch.randn(2, *shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
            mine = grad_of(lambda x: (svd_gap_aware(x)[1] ** 3).sum(), a)
            ref = grad_of(lambda x: (torch.linalg.svd(x)[1] ** 3).sum(), a)
            assert torch.equal(mine, ref), (dtype, shape)
