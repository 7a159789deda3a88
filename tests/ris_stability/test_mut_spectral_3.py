"""THE tie rule and its weights (spectral/rule.py) through the public functions: tolerances per dtype and size,
what has none refused in words, the Lorentzian at the tie threshold and at zero width, batches of matrices at
different scales weighed each at its own."""
from __future__ import annotations

import pytest
import torch

from ris_stability.numerics.tolerances import ToleranceError
from ris_stability.spectral import (eigh_gap_aware, eps_of, lorentz, pair_weights, real_dtype_of, svd_gap_aware,
                                    tie_rtol, tiny_of)


def test_tolerances_of_each_dtype():
    for dtype, real in [(torch.float32, torch.float32), (torch.complex64, torch.float32), (torch.float64, torch.float64),
                        (torch.complex128, torch.float64), (torch.bfloat16, torch.bfloat16)]:
        assert real_dtype_of(dtype) == real and eps_of(dtype) == torch.finfo(real).eps
        assert tiny_of(dtype) == torch.finfo(real).tiny
    assert tie_rtol(0, torch.float64) == tie_rtol(8, torch.float64) == 16 * torch.finfo(torch.float64).eps
    assert tie_rtol(9, torch.complex64) == 18 * torch.finfo(torch.float32).eps


def test_what_has_no_tolerance_is_refused_in_words():
    with pytest.raises(ToleranceError) as error:
        eps_of(torch.int64)
    assert isinstance(error.value, TypeError) and isinstance(error.value, ValueError)
    assert str(error.value) == ("no floating-point tolerance for dtype torch.int64: spectral statistics need a float or "
                                "complex tensor; cast the matrix (e.g. .to(torch.float64)) before asking for its "
                                "statistics")
    with pytest.raises(ValueError, match=r"^tie_rtol: matrix size n must be >= 0, got n=-1$"):
        tie_rtol(-1, torch.float64)


def test_lorentz_drops_ties_up_to_and_including_the_threshold():
    tau, e = 1e-3, torch.tensor([-2e-3, -1e-3, 0.0, 5e-4, 1e-3, 1e-3 + 1e-9, 0.5], dtype=torch.float64)
    for width in (0.0, 1e-3, 1e-2):
        got = lorentz(e, tau, width)
        expected = torch.where(e.abs() <= tau, 0.0, e / (e * e + width * width))
        assert torch.allclose(got, expected, rtol=4 * torch.finfo(torch.float64).eps, atol=0) and torch.isfinite(got).all()
    assert lorentz(e, tau, 0.0)[-1].item() == 2.0  # zero width: exactly 1/e outside the ties
    assert torch.equal(e, torch.tensor([-2e-3, -1e-3, 0.0, 5e-4, 1e-3, 1e-3 + 1e-9, 0.5], dtype=torch.float64))


def test_integer_eps_is_a_width_like_its_float():
    a = torch.tensor([[2.0, 0.1], [0.1, 1.0]], dtype=torch.float64)
    for decompose in (eigh_gap_aware, svd_gap_aware):
        grads = []
        for eps in (0, 0.0, 1, 1.0):
            x = a.clone().requires_grad_()
            (decompose(x, eps=eps)[-1 if decompose is eigh_gap_aware else 0][0, 0] ** 2).backward()
            grads.append(x.grad)
        assert torch.equal(grads[0], grads[1]) and torch.equal(grads[2], grads[3])
        assert not torch.equal(grads[0], grads[2])


def test_each_matrix_of_a_batch_is_weighed_at_its_own_scale():
    gen = torch.Generator().manual_seed(30)
    lam = torch.sort(torch.randn(2, 3, 5, dtype=torch.float64, generator=gen), dim=-1).values
    lam = lam * torch.logspace(-3, 3, 6, dtype=torch.float64).reshape(2, 3, 1)
    lam[1, 2, 1] = lam[1, 2, 2]  # one tie, in one matrix
    for eps in (None, 1e-2):
        batched = pair_weights(lam, eps=eps)
        for i in range(2):
            for j in range(3):
                assert torch.allclose(batched[i, j], pair_weights(lam[i, j], eps=eps), rtol=1e-15, atol=0)
    a = torch.randn(2, 3, 4, 3, dtype=torch.float64, generator=gen) * torch.logspace(-3, 3, 6, dtype=torch.float64).reshape(2, 3, 1, 1)

    def loss(x):
        u, s, vh = svd_gap_aware(x, full_matrices=False, eps=1e-2)
        return (u[..., :2] @ u[..., :2].mT).square().sum() + (vh[..., :1, :].mT @ vh[..., :1, :])[..., 0, 1].sum()

    x = a.clone().requires_grad_()
    loss(x).backward()
    for i in range(2):
        for j in range(3):
            one = a[i, j].clone().requires_grad_()
            loss(one).backward()
            assert torch.allclose(x.grad[i, j], one.grad, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- the eigh backward by hand
@pytest.mark.parametrize("eps", [None, 0.0, 1e-2, 0.3])
def test_eigh_near_pair_gradient_is_the_lorentzian_of_the_gap(eps):
    """A = c diag(1, 1 - d): turning the lower eigenvector towards the upper one costs -F(d) / (2 c) off the
    diagonal, F the Lorentzian x / (x^2 + w^2) of the relative gap with the width the user passed."""
    c, d = 2.0, 1e-3
    a = torch.diag(torch.tensor([c, c * (1 - d)], dtype=torch.float64)).requires_grad_()
    lam, v = eigh_gap_aware(a, eps=eps)
    (v[0, 0] * v[1, 0] + 3 * lam[1]).backward()
    w = tie_rtol(2, torch.float64) if eps is None else eps
    pair = -d / (d * d + w * w) / (2 * c)
    expected = torch.tensor([[3.0, pair], [pair, 0.0]], dtype=torch.float64)
    assert torch.allclose(a.grad, expected, rtol=64 * torch.finfo(torch.float64).eps, atol=0)


def test_eigenvalue_losses_get_torchs_gradient_bit_for_bit():
    """A loss on the eigenvalues alone takes torch's own formula V diag(g) V^H, any size (1 x 1 included)."""
    for dtype in (torch.float32, torch.float64, torch.complex128):
        for n in (1, 2, 6):
            x = torch.randn(3, n, n, dtype=dtype, generator=torch.Generator().manual_seed(n))
            h = x + x.mH
            grads = []
            for fn in (eigh_gap_aware, torch.linalg.eigh):
                leaf = h.clone().requires_grad_()
                (fn(leaf)[0] ** 3).sum().backward()
                grads.append(leaf.grad)
            assert torch.equal(*grads), (dtype, n)
    one = torch.tensor([[-2.5]], dtype=torch.float64, requires_grad=True)
    lam, v = eigh_gap_aware(one)
    (lam.sum() * 4 + v.sum()).backward()
    assert one.grad.item() == 4.0


def test_empty_matrices_in_a_batch_of_any_depth_get_an_empty_gradient():
    for shape in [(3, 2, 0, 0), (2, 0, 3, 3)]:
        a = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        lam, v = eigh_gap_aware(a)
        (lam.sum() + v.sum()).backward()
        assert a.grad.shape == shape and lam.shape == shape[:-1]
