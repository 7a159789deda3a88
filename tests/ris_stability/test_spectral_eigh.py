"""ris_stability.spectral.eigh_gap_aware: torch's forward bit for bit, torch's gradient on separated spectra, the exact
gradient of rotation-invariant losses on degenerate spectra (where torch's own backward is NaN)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ris_model.numerics import degenerate_tol
from ris_stability.spectral import (PhaseDependenceError, SpectralArgumentError, eigh_gap_aware, eps_of, pair_weights,
                                    tie_rtol)
from ris_stability.numerics.tolerances import tie_tol

ALL_DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
EXACT_DTYPES = [torch.float64, torch.complex128]


# ----------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_unitary(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=dtype, generator=_gen(seed)))
    return q * torch.sgn(torch.diagonal(r)).unsqueeze(-2)


def random_hermitian(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(n, n, dtype=dtype, generator=_gen(seed))
    return (x + x.mH) / 2


def from_spectrum(eigenvalues: list[float], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """B = Q diag(lambda) Q^H, built in float64/complex128 and then cast (ties stay exact in B's
    construction; the eigensolver of the cast matrix sees them as a tight cluster)."""
    hi = torch.complex128 if dtype.is_complex else torch.float64
    q = random_unitary(len(eigenvalues), hi, seed)
    b = (q * torch.tensor(eigenvalues, dtype=torch.float64).unsqueeze(-2)) @ q.mH
    return ((b + b.mH) / 2).to(dtype)


def shrinkage_matrix(n: int, rank: int, alpha: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(1 - alpha) W W^H / tr + alpha tr/N I: the R_eff structure whose noise eigenvalues tie."""
    w = torch.randn(n, rank, dtype=torch.complex128 if dtype.is_complex else torch.float64, generator=_gen(seed))
    low = w @ w.mH
    low = low / torch.diagonal(low).real.sum()
    return ((1 - alpha) * low + alpha / n * torch.eye(n, dtype=low.dtype)).to(dtype)


def top_projector(eigenvectors: torch.Tensor, k: int) -> torch.Tensor:
    top = eigenvectors[..., -k:]
    return top @ top.mH


def projector_loss(fn, b: torch.Tensor, k: int, target: torch.Tensor) -> torch.Tensor:
    _, v = fn(b)
    return (top_projector(v, k) * target).sum().real


def spectral_loss(fn, b, c, w, g):
    """Re tr(G V diag(c) V^H) + w . lambda: rotation-invariant when c, w are constant per cluster."""
    lam, v = fn(b)
    return ((v * c.to(v.dtype).unsqueeze(-2)) @ v.mH * g.mT).sum().real + (lam * w).sum()


def exact_spectral_grad(b, c, w, g, cluster_of):
    """Daleckii-Krein: d/dA Re tr(G f(A)) = V (Gamma o V^H G V) V^H with Gamma_ij the divided
    difference of f (0 inside a cluster, where f is constant), plus V diag(w) V^H."""
    lam, v = torch.linalg.eigh(b)
    dl = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    same = cluster_of.unsqueeze(-1) == cluster_of.unsqueeze(-2)
    gamma = torch.where(same, torch.zeros_like(dl), (c.unsqueeze(-1) - c.unsqueeze(-2)) / torch.where(same, 1.0, dl))
    inner = gamma.to(v.dtype) * (v.mH @ g @ v) + torch.diag_embed(w).to(v.dtype)
    return v @ inner @ v.mH


def fd_directional(loss_of_b, b: torch.Tensor, direction: torch.Tensor, h: float) -> float:
    with torch.no_grad():
        return float((loss_of_b(b + h * direction) - loss_of_b(b - h * direction)) / (2 * h))


def grad_of(loss_of_b, b: torch.Tensor) -> torch.Tensor:
    leaf = b.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_of_b(leaf), leaf)
    return grad


def inner_product(grad: torch.Tensor, direction: torch.Tensor) -> float:
    """PyTorch's convention: dL = Re <grad, dA> = Re sum(conj(grad) * dA)."""
    return float((grad.conj() * direction).sum().real)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_forward_is_bit_identical_to_torch(dtype):
    a = random_hermitian(9, dtype, 0).expand(2, 3, 9, 9).clone() + torch.arange(6).reshape(2, 3, 1, 1)
    lam, v = eigh_gap_aware(a)
    ref_lam, ref_v = torch.linalg.eigh(a)
    assert torch.equal(lam, ref_lam) and torch.equal(v, ref_v)
    assert lam.dtype == ref_lam.dtype and v.dtype == dtype
    assert torch.all(lam[..., 1:] >= lam[..., :-1])  # ascending


@pytest.mark.parametrize("uplo", ["L", "U"])
def test_autograd_node_name_named_tuple_and_uplo(uplo):
    a = torch.randn(5, 5, dtype=torch.complex128, generator=_gen(1)).requires_grad_()  # not Hermitian: UPLO matters
    out = eigh_gap_aware(a, uplo)
    ref = torch.linalg.eigh(a, UPLO=uplo)
    assert type(out) is type(ref) and out.eigenvectors.grad_fn.name() == "EighGapAwareBackward"
    assert torch.equal(out.eigenvalues, ref.eigenvalues) and torch.equal(out.eigenvectors, ref.eigenvectors)


# ----------------------------------------------------------------------------- well separated
def _separated(dtype, seed, batch=()):
    spectrum = [-2.0, -0.7, 0.4, 1.1, 2.5, 3.3]
    b = from_spectrum(spectrum, dtype, seed)
    return b.expand(*batch, 6, 6).clone() if batch else b


LOSSES = {
    "eigenvalues": lambda lam, v, t: (lam * torch.linspace(-1, 2, lam.shape[-1], dtype=lam.dtype)).sum(),
    "projector": lambda lam, v, t: (top_projector(v, 2) * t).sum().real,
    "mixed": lambda lam, v, t: lam[..., -1].sum() ** 2 + (top_projector(v, 3) @ t).abs().square().sum(),
    "column_moduli": lambda lam, v, t: (v.abs().square() * t.real).sum(),  # phase-invariant, every column
}


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_separated_gradient_equals_torch(dtype, loss_name):
    b = _separated(dtype, 2, batch=(2,))
    t = random_hermitian(6, dtype, 3)
    loss = LOSSES[loss_name]
    ours = grad_of(lambda x: loss(*eigh_gap_aware(x), t), b)
    ref = grad_of(lambda x: loss(*torch.linalg.eigh(x), t), b)
    assert rel_err(ours, ref) < 1e-8


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_separated_gradcheck(dtype, loss_name):
    x0 = torch.randn(6, 6, dtype=dtype, generator=_gen(4))
    t = random_hermitian(6, dtype, 5)

    def f(x):  # hermitise inside, so gradcheck perturbs only Hermitian directions of A
        return LOSSES[loss_name](*eigh_gap_aware(x + x.mH), t)

    assert torch.autograd.gradcheck(f, (x0.requires_grad_(),))


def test_separated_gradgradcheck():
    x0 = torch.randn(5, 5, dtype=torch.complex128, generator=_gen(6)).requires_grad_()
    t = random_hermitian(5, torch.complex128, 7)
    assert torch.autograd.gradgradcheck(lambda x: LOSSES["mixed"](*eigh_gap_aware(x + x.mH), t), (x0,))


@pytest.mark.parametrize("shape", [(0, 4, 4), (2, 0, 0)], ids=["empty-batch", "empty-matrix"])
def test_empty_inputs_like_torch(shape):
    a = torch.zeros(shape, dtype=torch.complex128, requires_grad=True)
    lam, v = eigh_gap_aware(a)
    (lam.sum() + v.abs().square().sum()).backward()
    assert lam.shape == shape[:-1] and v.shape == shape and a.grad.shape == shape


def test_phase_dependent_loss_is_refused_like_torch():
    b = _separated(torch.complex128, 8).requires_grad_()
    with pytest.raises(RuntimeError, match=r"e\^\{i phi\}"):
        torch.linalg.eigh(b)[1].real.sum().backward()
    with pytest.raises(PhaseDependenceError, match=r"max \|Im diag"):
        eigh_gap_aware(b)[1].real.sum().backward()


def test_upstream_nan_surfaces_as_nan_not_as_phase_error():
    b = _separated(torch.complex128, 9).requires_grad_()
    _, v = eigh_gap_aware(b)
    (top_projector(v, 2).abs().sum() * float("nan")).backward()
    assert torch.isnan(b.grad).all()


# ----------------------------------------------------------------------------- degenerate
def _tied_block(dtype):
    """Signal block (eigenvalues >= 1) next to 0.01 * I_5: the solver returns bit-exact ties."""
    s = torch.randn(3, 3, dtype=dtype, generator=_gen(10))
    return torch.block_diag(s @ s.mH + torch.eye(3, dtype=dtype), 0.01 * torch.eye(5, dtype=dtype))


@pytest.mark.parametrize("eps", [None, 0.0], ids=["default-eps", "mask-only"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_exact_ties_torch_nan_gap_aware_exact(dtype, eps):
    b = _tied_block(dtype)
    t = random_hermitian(8, dtype, 11)
    assert torch.unique(torch.linalg.eigvalsh(b)[:5]).numel() == 1  # ties are bit-exact
    torch_grad = grad_of(lambda x: projector_loss(torch.linalg.eigh, x, 3, t), b)
    ours = grad_of(lambda x: projector_loss(lambda y: eigh_gap_aware(y, eps=eps), x, 3, t), b)
    assert torch.isnan(torch_grad).any()
    assert torch.isfinite(ours).all()
    hi = torch.complex128 if dtype.is_complex else torch.float64
    cluster_of = torch.tensor([0] * 5 + [1] * 3)
    c = torch.tensor([0.0] * 5 + [1.0] * 3, dtype=torch.float64)
    # (P * t).sum() = tr(t^T P): G = t^T
    exact = exact_spectral_grad(b.to(hi), c, torch.zeros(8, dtype=torch.float64), t.mT.to(hi), cluster_of)
    assert rel_err(ours.to(hi), exact) < (1e-12 if dtype in EXACT_DTYPES else 1e-5)


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_shrinkage_projector_matches_finite_difference(dtype):
    n, rank = 48, 8
    b = shrinkage_matrix(n, rank, 1e-3, dtype, 12)
    t = random_hermitian(n, dtype, 13)
    loss_of_b = lambda x: projector_loss(eigh_gap_aware, x, rank, t)  # noqa: E731
    grad = grad_of(loss_of_b, b)
    assert torch.isfinite(grad).all()
    for seed in (14, 15):
        d = random_hermitian(n, dtype, seed)
        d = d / d.norm()
        fd = fd_directional(loss_of_b, b, d, h=1e-6)
        assert abs(inner_product(grad, d) - fd) <= 1e-6 * grad.norm().item()


def test_shrinkage_complex64_finite_and_close_to_complex128_where_torch_fails():
    """N = 144 R_eff-like batch: torch's backward is non-finite on every matrix whose computed noise
    eigenvalues contain a bit-exact tie (3 of 8 with MKL); the gap-aware one is finite on all."""
    n, rank = 144, 26
    b64 = torch.stack([shrinkage_matrix(n, rank, 1e-3, torch.complex64, s) for s in range(8)])
    t = random_hermitian(n, torch.complex64, 16)
    ours = grad_of(lambda x: projector_loss(eigh_gap_aware, x, rank, t), b64)
    ref = grad_of(lambda x: projector_loss(eigh_gap_aware, x, rank, t.to(torch.complex128)), b64.to(torch.complex128))
    torch_grad = grad_of(lambda x: projector_loss(torch.linalg.eigh, x, rank, t), b64)
    assert torch.isfinite(ours).all()
    for i in range(8):
        assert rel_err(ours[i].to(torch.complex128), ref[i]) < 1e-3
    noise = torch.linalg.eigh(b64)[0][:, : n - rank]
    exact_tie = (noise[:, 1:] == noise[:, :-1]).any(-1)
    finite_torch = torch.isfinite(torch_grad).flatten(1).all(-1)
    assert not finite_torch[exact_tie].any()


def test_complex128_torch_garbage_on_invariant_full_basis_loss():
    """A loss using every eigenvector, invariant per cluster (Re tr(G f(A))): torch divides rounding
    noise by ~1e-17 gaps even in complex128; the gap-aware gradient is the exact one."""
    spectrum = [0.1] * 4 + [0.5] * 3 + [2.0]
    b = from_spectrum(spectrum, torch.complex128, 17)
    cluster_of = torch.tensor([0] * 4 + [1] * 3 + [2])
    c = torch.tensor([1.0] * 4 + [-2.0] * 3 + [0.5], dtype=torch.float64)
    w = torch.zeros(8, dtype=torch.float64)
    g = random_hermitian(8, torch.complex128, 18)
    exact = exact_spectral_grad(b, c, w, g, cluster_of)
    ours = grad_of(lambda x: spectral_loss(eigh_gap_aware, x, c, w, g), b)
    theirs = grad_of(lambda x: spectral_loss(torch.linalg.eigh, x, c, w, g), b)
    assert rel_err(ours, exact) < 1e-10
    assert not (torch.isfinite(theirs).all() and rel_err(theirs, exact) < 1e-3)


@settings(deadline=None, max_examples=30)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=5),
    gaps=st.lists(st.floats(0.05, 2.0), min_size=5, max_size=5),
    negative_shift=st.floats(0.0, 3.0),
    complex_=st.booleans(),
    eps=st.sampled_from([None, 0.0, 1e-4]),
    seed=st.integers(0, 2**16),
)
def test_random_cluster_structures(sizes, gaps, negative_shift, complex_, eps, seed):
    """Masking alone (eps=0) and the default broadening give the exact gradient; a wide width 1e-4
    biases each pair term by at most (1e-4 / e)^2 <= 4e-4, as inter-cluster gaps e >= 0.05 / 10."""
    dtype = torch.complex128 if complex_ else torch.float64
    values = [sum(gaps[: k + 1]) - negative_shift for k in range(len(sizes))]
    spectrum = [values[k] for k, size in enumerate(sizes) for _ in range(size)]
    n = len(spectrum)
    cluster_of = torch.tensor([k for k, size in enumerate(sizes) for _ in range(size)])
    gen = _gen(seed)
    c = torch.randn(len(sizes), dtype=torch.float64, generator=gen)[cluster_of]
    w = torch.randn(len(sizes), dtype=torch.float64, generator=gen)[cluster_of]
    b = from_spectrum(spectrum, dtype, seed)
    g = random_hermitian(n, dtype, seed + 1)
    loss_of_b = lambda x: spectral_loss(lambda y: eigh_gap_aware(y, eps=eps), x, c, w, g)  # noqa: E731
    grad = grad_of(loss_of_b, b)
    assert torch.isfinite(grad).all()
    tol = 1e-9 if eps != 1e-4 else 1e-3
    assert rel_err(grad, exact_spectral_grad(b, c, w, g, cluster_of)) < tol
    d = random_hermitian(n, dtype, seed + 2)
    d = d / d.norm()
    fd = fd_directional(loss_of_b, b, d, h=1e-6)
    assert abs(inner_product(grad, d) - fd) <= max(tol, 1e-6) * max(grad.norm().item(), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64], ids=str)
def test_single_precision_cluster_close_to_double(dtype):
    spectrum = [0.2] * 5 + [1.0, 1.7, 2.9]
    b = from_spectrum(spectrum, dtype, 19).expand(3, 8, 8).clone()
    t = random_hermitian(8, dtype, 20)
    hi = torch.complex128 if dtype.is_complex else torch.float64
    ours = grad_of(lambda x: projector_loss(eigh_gap_aware, x, 3, t), b)
    ref = grad_of(lambda x: projector_loss(eigh_gap_aware, x, 3, t.to(hi)), b.to(hi))
    assert torch.isfinite(ours).all() and rel_err(ours.to(hi), ref) < 1e-4


def test_batched_mix_of_separated_and_degenerate():
    sep = _separated(torch.complex128, 21)
    deg = from_spectrum([0.3] * 4 + [1.0, 2.0], torch.complex128, 22)
    b = torch.stack([torch.stack([sep, deg]), torch.stack([deg * 5, sep * 1e-3])])  # (2, 2, 6, 6)
    t = random_hermitian(6, torch.complex128, 23)
    ours = grad_of(lambda x: projector_loss(eigh_gap_aware, x, 2, t), b)
    assert torch.isfinite(ours).all()
    for idx in [(0, 0), (1, 1)]:  # the separated ones equal torch's per-matrix gradient
        ref = grad_of(lambda x: projector_loss(torch.linalg.eigh, x, 2, t), b[idx])
        assert rel_err(ours[idx], ref) < 1e-8


# ----------------------------------------------------------------------------- pair weights
def test_pair_weights_rule():
    lam = torch.tensor([-1.0, 0.5, 0.5 + 1e-15, 0.5 + 1e-9, 0.5 + 1e-6, 2.0], dtype=torch.float64)
    s, tau = 2.0, tie_rtol(6, torch.float64)
    f = pair_weights(lam)
    assert torch.all(torch.diagonal(f) == 0)
    assert f[1, 2] == 0 and f[2, 1] == 0  # tied: relative gap 5e-16 <= tau = 16 eps
    assert f[0, 5].item() == pytest.approx(1 / 3.0, rel=1e-14)  # wide gap: 1 / (l_j - l_i)
    # gap 1e-9 >> tau s: 1 / E up to the bias (tau s / 1e-9)^2 ~ 1e-10
    assert f[1, 3].item() == pytest.approx(1 / float(lam[3] - lam[1]), rel=1e-9)
    assert torch.equal(f, -f.mT)
    assert torch.equal(f, pair_weights(lam, eps=tau))  # default width = tie threshold
    w = 1e-8  # an explicit width: Lorentzian e / (e^2 + w^2) in units of s
    fw = pair_weights(lam, eps=w)
    for j in (3, 4):
        e = float(lam[j] - lam[1]) / s
        assert fw[1, j].item() == pytest.approx(e / (e * e + w * w) / s, rel=1e-12)
    assert fw[1, 3].item() < 1e-2 / float(lam[3] - lam[1])  # gap 1e-9 < w s: strongly damped
    bias = 1 - fw[1, 4].item() * float(lam[4] - lam[1])  # gap 1e-6 > w s: relative bias w^2/e^2
    assert bias == pytest.approx((w * s / float(lam[4] - lam[1])) ** 2, rel=1e-3)
    assert fw.abs().max().item() <= 1 / (2 * w * s) * (1 + 1e-12)


def test_pair_weights_scale_invariant_and_eps_zero_is_exact():
    lam = torch.tensor([[0.1, 0.4, 3.0], [1.0, 1.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(pair_weights(1e6 * lam), pair_weights(lam) / 1e6, rtol=1e-14, atol=0)
    f0 = pair_weights(lam, eps=0.0)
    assert f0[0, 0, 1].item() == pytest.approx(1 / 0.3, rel=1e-14)
    assert f0[1, 0, 1].item() == 0.0
    assert torch.all(pair_weights(torch.zeros(2, 4)) == 0)  # zero matrix: all tied, no 0/0


def test_one_tie_rule_for_toolkit_backward_and_pipeline():
    """THE tie rule: 2 max(n, 8) eps, defined in ris_stability.spectral and used by the toolkit's statistics
    (tolerances.tie_tol), the gap-aware backwards and ris_model alike."""
    for dtype in (torch.float32, torch.complex64, torch.float64, torch.complex128):
        for n in (1, 2, 8, 9, 144):
            assert tie_rtol(n, dtype) == 2 * max(n, 8) * torch.finfo(dtype.to_real()).eps
            assert tie_tol(n, dtype, 3.0) == tie_rtol(n, dtype) * 3.0
            assert degenerate_tol(dtype, n) == tie_rtol(n, dtype)
    assert eps_of(torch.complex128) == torch.finfo(torch.float64).eps
    assert tie_rtol(10, torch.float64) < tie_rtol(10, torch.float32)
    lam = torch.tensor([0.0, 1.0, 1.0 + tie_rtol(3, torch.float64), 2.0], dtype=torch.float64) / 2.0
    f = pair_weights(lam * 2.0)
    assert f[1, 2] == 0 and f[0, 1] != 0  # the backward drops exactly the pairs the rule calls tied


# ----------------------------------------------------------------------------- bad arguments
BAD_CALLS = [
    pytest.param(lambda a: eigh_gap_aware(a, eps=-1e-3), "eps", id="negative-eps"),
    pytest.param(lambda a: eigh_gap_aware(a, eps=float("nan")), "eps", id="nan-eps"),
    pytest.param(lambda a: eigh_gap_aware(a, eps=float("inf")), "eps", id="inf-eps"),
    pytest.param(lambda a: eigh_gap_aware(a, eps=True), "eps", id="bool-eps"),
    pytest.param(lambda a: eigh_gap_aware(a[:, :3]), "square", id="non-square"),
]


@pytest.mark.parametrize("call, message", BAD_CALLS)
def test_bad_arguments_raise_with_explanation(call, message):
    with pytest.raises(SpectralArgumentError, match=message):
        call(random_hermitian(4, torch.float64, 24))
