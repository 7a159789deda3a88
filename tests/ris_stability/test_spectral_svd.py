"""ris_stability.spectral.svd_gap_aware: torch's forward bit for bit, torch's gradient on gapped spectra, a
finite and exact gradient for cluster-invariant losses on tied and rank-deficient inputs (where torch's
own backward is NaN), full and reduced, real and complex, tall, wide and square."""
from __future__ import annotations

import pytest
import torch

from ris_stability.spectral import PhaseDependenceError, SpectralArgumentError, svd_gap_aware, svd_old_gap_aware

EXACT = [torch.float64, torch.complex128]
SHAPES = [(6, 6), (8, 5), (5, 8)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unitary(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=dtype, generator=_gen(seed)))
    return q * torch.sgn(torch.diagonal(r)).unsqueeze(-2)


def with_singular_values(m: int, n: int, s: list[float], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """U diag(s) V^H built in double precision, then cast."""
    hi = torch.complex128 if dtype.is_complex else torch.float64
    u, v = unitary(m, hi, seed)[:, : len(s)], unitary(n, hi, seed + 1)[:, : len(s)]
    return ((u * torch.tensor(s, dtype=torch.float64)) @ v.mH).to(dtype)


def grad_of(loss_of_a, a: torch.Tensor) -> torch.Tensor:
    leaf = a.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_of_a(leaf), leaf)
    return grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def left_projector(u: torch.Tensor, k: int) -> torch.Tensor:
    return u[..., :, :k] @ u[..., :, :k].mH


def right_projector(vh: torch.Tensor, k: int) -> torch.Tensor:
    return vh[..., :k, :].mH @ vh[..., :k, :]


def targets(m: int, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(m, m, dtype=dtype, generator=_gen(seed)), torch.randn(n, n, dtype=dtype, generator=_gen(seed + 1)))


LOSSES = {
    "singular_values": lambda u, s, vh, t: (s * torch.linspace(1, 2, s.shape[-1], dtype=s.dtype)).square().sum(),
    # invariant inside clusters and smooth at s = 0 (a function of A^H A), unlike the nuclear norm
    "symmetric_values": lambda u, s, vh, t: s.pow(4).sum() + s.square().sum() ** 2,
    "left_projector": lambda u, s, vh, t: (left_projector(u, 2) * t[0]).sum().real,
    "projectors": lambda u, s, vh, t: (left_projector(u, 2) * t[0]).sum().real
    + (right_projector(vh, 2) @ t[1]).abs().square().sum(),
    "mixed": lambda u, s, vh, t: s[..., 0].sum() ** 2 + (left_projector(u, 3) * t[0]).sum().real
    + (right_projector(vh, 1) * t[1]).sum().real,
}


def svd_loss(fn, name: str, t, full: bool = False):
    return lambda a: LOSSES[name](*fn(a, full_matrices=full), t)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("full", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128], ids=str)
def test_forward_is_bit_identical_to_torch(dtype, shape, full):
    a = torch.randn(2, *shape, dtype=dtype, generator=_gen(0)).requires_grad_()
    out, ref = svd_gap_aware(a, full_matrices=full), torch.linalg.svd(a, full_matrices=full)
    assert type(out) is type(ref) and out.U.grad_fn.name() == "SvdGapAwareBackward"
    assert all(torch.equal(x, y) for x, y in zip(out, ref))
    old, old_ref = svd_old_gap_aware(a, some=not full), torch.svd(a, some=not full)
    assert type(old) is type(old_ref) and all(torch.equal(x, y) for x, y in zip(old, old_ref))


# ----------------------------------------------------------------------------- gapped: torch's gradient
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("full", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_gapped_gradient_equals_torch(dtype, shape, full, loss):
    a = torch.randn(3, *shape, dtype=dtype, generator=_gen(1))
    t = targets(*shape, dtype, 2)
    ours = grad_of(svd_loss(svd_gap_aware, loss, t, full), a)
    ref = grad_of(svd_loss(torch.linalg.svd, loss, t, full), a)
    assert rel_err(ours, ref) < 1e-8


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_gapped_gradcheck(dtype, shape, loss):
    a = torch.randn(*shape, dtype=dtype, generator=_gen(3)).requires_grad_()
    assert torch.autograd.gradcheck(svd_loss(svd_gap_aware, loss, targets(*shape, dtype, 4)), (a,))


def test_torch_svd_spellings_gradient_equals_torch():
    a = torch.randn(7, 4, dtype=torch.complex128, generator=_gen(5))
    t = targets(7, 4, torch.complex128, 6)

    def loss(fn):
        return lambda x: LOSSES["projectors"](*(lambda u, s, v: (u, s, v.mH))(*fn(x)), t)
    assert rel_err(grad_of(loss(svd_old_gap_aware), a), grad_of(loss(torch.svd), a)) < 1e-10


# ----------------------------------------------------------------------------- ties and rank deficiency
def _fd(loss_of_a, a, d, h=1e-6) -> float:
    with torch.no_grad():
        return float((loss_of_a(a + h * d) - loss_of_a(a - h * d)) / (2 * h))


CASES = {  # (m, n, singular values): clusters the losses below are invariant in (they use the top 2)
    "tied-signal-tail": (6, 6, [3.0, 2.0, 0.5, 0.5, 0.5, 0.1]),
    "rank-deficient-square": (6, 6, [3.0, 2.0, 1.0]),
    "rank-deficient-tall": (8, 5, [3.0, 2.0, 1.0]),
    "rank-deficient-wide": (5, 8, [3.0, 2.0]),
    "tied-and-null": (7, 7, [3.0, 2.0, 0.7, 0.7, 0.7]),
}


@pytest.mark.parametrize("full", [False, True], ids=["reduced", "full"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", EXACT, ids=str)
def test_cluster_invariant_losses_finite_and_equal_to_central_fd(dtype, case, full):
    m, n, s = CASES[case]
    a = with_singular_values(m, n, s, dtype, 7)
    t = targets(m, n, dtype, 8)
    for name in ("symmetric_values", "projectors"):
        loss = svd_loss(svd_gap_aware, name, t, full)
        grad = grad_of(loss, a)
        assert torch.isfinite(grad).all()
        for seed in (9, 10):
            d = torch.randn(m, n, dtype=dtype, generator=_gen(seed))
            d = d / d.norm()
            assert abs(float((grad.conj() * d).sum().real) - _fd(loss, a, d)) <= 1e-7 * max(grad.norm().item(), 1)


@pytest.mark.parametrize("case", ["rank-deficient-square", "rank-deficient-tall", "tied-and-null"])
def test_arbitrary_null_space_columns_do_not_matter(case):
    """The null-space columns of U and V (and the basis of a tied cluster) are an arbitrary basis the loss does
    not see: the gradient equals torch's own on the same matrix with every singular value below the top 2 the
    loss uses lifted by a distinct tiny amount (which fixes that basis and makes torch's backward finite,
    whatever the LAPACK build returns for an exact tie)."""
    m, n, s = CASES[case]
    a = with_singular_values(m, n, s, torch.complex128, 11)
    t = targets(m, n, torch.complex128, 12)
    ours = grad_of(svd_loss(svd_gap_aware, "projectors", t), a)
    k = min(m, n)
    lift = torch.linspace(1.0, 2.0, k - 2, dtype=torch.float64) * 1e-7  # distinct, tiny, not tied
    u, _, vh = torch.linalg.svd(a)
    gapped = a + (u[:, 2:k] * lift.to(a.dtype)) @ vh[2:k, :]
    ref = grad_of(svd_loss(torch.linalg.svd, "projectors", t), gapped)
    assert torch.isfinite(ref).all() and rel_err(ours, ref) < 1e-5


def test_torch_nan_where_gap_aware_is_finite_on_exact_zeros():
    a = torch.zeros(6, 6, dtype=torch.complex128)
    a[:3, :3] = torch.randn(3, 3, dtype=torch.complex128, generator=_gen(13))  # exact zeros by construction
    t = targets(6, 6, torch.complex128, 14)
    assert torch.isnan(grad_of(svd_loss(torch.linalg.svd, "left_projector", t), a)).any()
    assert torch.isfinite(grad_of(svd_loss(svd_gap_aware, "left_projector", t), a)).all()


def test_zero_matrix_and_empty_inputs():
    z = torch.zeros(2, 4, 3, dtype=torch.float64)
    assert torch.all(grad_of(svd_loss(svd_gap_aware, "projectors", targets(4, 3, torch.float64, 0)), z) == 0)
    e = torch.zeros(2, 0, 3, dtype=torch.complex128, requires_grad=True)
    u, s, vh = svd_gap_aware(e, full_matrices=False)
    (s.sum() + u.abs().sum() + vh.abs().sum()).backward()
    assert e.grad.shape == e.shape


# ----------------------------------------------------------------------------- outside-codebase pattern
def rank25_covariance(dtype: torch.dtype) -> torch.Tensor:
    """A rank-25 complex 144 x 144 covariance of a field on 25 of 144 elements: its 119 null singular values
    are exactly 0 by construction (zero rows and columns), so the ties hold on any BLAS."""
    x = torch.randn(25, 40, dtype=torch.complex128, generator=_gen(15))
    r = torch.zeros(144, 144, dtype=torch.complex128)
    r[:25, :25] = x @ x.mH / 40
    return r.to(dtype)


def top_k_projection_loss(svd, r: torch.Tensor, target: torch.Tensor, k: int = 5) -> torch.Tensor:
    u = svd(r)[0]
    return (left_projector(u, k) * target).sum().real


def test_rank25_top_k_left_singular_vectors_gap_aware_context_vs_complex128():
    from ris_stability import gap_aware
    r = rank25_covariance(torch.complex64)
    target = torch.randn(144, 144, dtype=torch.complex64, generator=_gen(16))
    torch_grad = grad_of(lambda x: top_k_projection_loss(torch.linalg.svd, x, target), r)
    assert torch.isnan(torch_grad).any()
    with gap_aware():
        ours = grad_of(lambda x: top_k_projection_loss(torch.linalg.svd, x, target), r)
    assert torch.isfinite(ours).all()
    # Reference: torch's own backward in complex128 on the null space lifted to distinct tiny values.
    r128 = rank25_covariance(torch.complex128)
    lift = torch.zeros(144, dtype=torch.complex128)
    lift[25:] = torch.linspace(1.0, 2.0, 119, dtype=torch.float64) * 1e-9
    ref = grad_of(lambda x: top_k_projection_loss(torch.linalg.svd, x, target.to(torch.complex128)),
                  r128 + torch.diag(lift))
    assert torch.isfinite(ref).all()
    assert rel_err(ours.to(torch.complex128), ref) < 1e-4


# ----------------------------------------------------------------------------- refusals
def test_phase_dependent_loss_is_refused_like_torch():
    a = torch.randn(5, 4, dtype=torch.complex128, generator=_gen(17)).requires_grad_()
    with pytest.raises(RuntimeError, match=r"e\^\{i phi\}"):
        torch.linalg.svd(a, full_matrices=False)[0].real.sum().backward()
    with pytest.raises(PhaseDependenceError, match=r"e\^\{i phi\}"):
        svd_gap_aware(a, full_matrices=False)[0].real.sum().backward()


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda a: svd_gap_aware(a, eps=-1.0), "eps", id="negative-eps"),
    pytest.param(lambda a: svd_gap_aware(a[0, 0]), "batch of matrices", id="vector"),
])
def test_bad_arguments_raise_with_explanation(call, message):
    with pytest.raises(SpectralArgumentError, match=message):
        call(torch.randn(3, 3, dtype=torch.float64))
