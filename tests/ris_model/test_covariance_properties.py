"""Hypothesis properties of THE covariance builder (docs/physics.md sections 3 and 5).

Inputs: factor matrices of any rank 0..K_MAX with column scales 1e-6..1e6 and exactly-zero columns,
sample covariances of rank 0..L (optionally with an anti-Hermitian part the builder must remove),
lambda_range, beta and shrinkage alpha drawn, matrix sizes N in SIZES (144 is the project's), complex64
and complex128.

Tolerances (functions of the builder's dtype, eps = torch.finfo(dtype).eps; eigenvalues of the builder's
outputs are computed in complex128, so they measure the rounding of the builder's own arithmetic):
- hermiticity: ||R - R^H||_F <= 2 eps ||R||_F. Hermitising is exact in IEEE arithmetic (conj is exact and
  + commutes); the 2 eps only absorbs a final scaling.
- trace: |tr R - 1| <= n eps (a sum of n rounded diagonal entries, then one division).
- eigenvalues, absolute, on the trace-1 scale: EIG_ABS = 4 (K_MAX + 2) eps. Forming A A^H rounds each entry
  by at most ~sqrt(2) (K_MAX + 2) eps (|A||A|^H)_ij (complex inner products of length K_MAX), a perturbation
  of spectral norm <= sqrt(2) (K_MAX + 2) eps ||A||_F^2 = that much times the trace, i.e. <= 1 after
  normalisation; the <= 6 elementwise steps after it (sum, scale, Hermitise, normalise, blend, shrink) each
  add <= eps ||R||_F <= eps. By Weyl every eigenvalue moves by at most that; we round up to 4 (K_MAX + 2).
  Used for PSD (lambda_min >= -EIG_ABS), numerical rank (lambda > EIG_ABS) and the noise cluster
  (|lambda - alpha/N| <= EIG_ABS). Measured worst noise eigenvalue over 300 random inputs: ~1 eps.
- eigenvalues, relative: n eps |lambda| (the trace divided by is itself off by n eps).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, event, find, given, note, settings
from hypothesis import strategies as st

from ris_model.complex_ops import ZeroTraceError, hermitise, outer, trace, trace_normalise
from ris_model.config import ChannelConfig, CovarianceConfig, SceneConfig
from ris_model.covariance import Covariances, build_covariances, inference_matrix, shrink
from ris_stability.spectral import tie_rtol

logger = logging.getLogger(__name__)

K_MAX = SceneConfig().k_max
L = ChannelConfig().snapshots
N_PROJECT = 144
SIZES = (8, 24, N_PROJECT)  # 8 < 2 K_MAX + L: the ranks saturate; 144: the project's RIS
DTYPES = [pytest.param(torch.complex64, id="complex64"), pytest.param(torch.complex128, id="complex128")]
PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIND = settings(max_examples=50, deadline=None, database=None, phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow])



Builder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, CovarianceConfig], Covariances]


# ----------------------------------------------------------------------------- tolerances
def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype.to_real()).eps


def herm_rtol(dtype: torch.dtype) -> float:
    return 2 * eps(dtype)


def trace_tol(dtype: torch.dtype, n: int) -> float:
    return n * eps(dtype)


def eig_abs(dtype: torch.dtype) -> float:
    """Rounding bound of every eigenvalue of a builder output (trace-1 scale): see the module docstring."""
    return 4 * (K_MAX + 2) * eps(dtype)


def eig_rel(dtype: torch.dtype, n: int) -> float:
    return n * eps(dtype)


# ----------------------------------------------------------------------------- generated inputs
@dataclass(frozen=True)
class Case:
    """One builder input plus the structural ranks it was built with (upper bounds on the true ranks)."""

    A: torch.Tensor  # (B, N, K_MAX) cov_fact_angle
    Bf: torch.Tensor  # (B, N, K_MAX) cov_fact_range
    R_samp: torch.Tensor  # (B, N, N), Hermitian part PSD with trace 1 (or zero for rank 0)
    cfg: CovarianceConfig
    rank_a: int
    rank_b: int
    rank_s: int

    @property
    def n(self) -> int:
        return self.A.shape[-2]

    @property
    def rank_pred_bound(self) -> int:
        return self.rank_a + (self.rank_b if self.cfg.lambda_range > 0 else 0)

    @property
    def rank_blend_bound(self) -> int:
        return min(self.n, self.rank_pred_bound + (self.rank_s if self.cfg.beta > 0 else 0))

    def __repr__(self) -> str:  # what Hypothesis prints for a falsifying example
        return (f"Case(N={self.n}, B={self.A.shape[0]}, dtype={self.A.dtype}, rank_a={self.rank_a}, "
                f"rank_b={self.rank_b}, rank_s={self.rank_s}, {self.cfg})")


COLUMN_KINDS = {"full": 1.0, "near-zero": 1e-12, "zero": 0.0}  # near-zero: 1e-12 of its drawn scale


def _factor(gen: torch.Generator, b: int, n: int, rank: int, log_scales: list[float], kinds: list[str]) -> tuple[torch.Tensor, int]:
    """U V with U (N, rank), V (rank, K_MAX), column j scaled by 10**log_scales[j] * COLUMN_KINDS[kinds[j]].
    Returns the factor and its structural rank (near-zero columns count: they are not exactly zero)."""
    u = torch.randn(b, n, rank, dtype=torch.complex128, generator=gen)
    v = torch.randn(b, rank, K_MAX, dtype=torch.complex128, generator=gen)
    scale = torch.tensor([10.0 ** s * COLUMN_KINDS[k] for s, k in zip(log_scales, kinds)], dtype=torch.float64)
    return (u @ v) * scale, min(rank, sum(k != "zero" for k in kinds))


def _sample_cov(gen: torch.Generator, b: int, n: int, rank: int, log_scales: list[float], skew: float) -> torch.Tensor:
    """G G^H / tr with column scales 10**log_scales (rank 0: the zero matrix) plus an anti-Hermitian part."""
    g = torch.randn(b, n, rank, dtype=torch.complex128, generator=gen) * torch.tensor(
        [10.0 ** s for s in log_scales[:rank]], dtype=torch.float64)
    r = g @ g.mH
    if rank > 0:
        r = r / trace(r)[:, None, None]
    x = torch.randn(b, n, n, dtype=torch.complex128, generator=gen)
    anti = x - x.mH
    return r + skew * anti / torch.linalg.matrix_norm(anti)[:, None, None] * torch.linalg.matrix_norm(r)[:, None, None]


@st.composite
def cases(draw, dtype: torch.dtype, alpha=st.just(0.0), skews=st.sampled_from([0.0, 1e-3])) -> Case:
    n = draw(st.sampled_from(SIZES))
    b = draw(st.integers(1, 2))
    log_scale = st.floats(-6.0, 6.0)
    cols = st.lists(log_scale, min_size=K_MAX, max_size=K_MAX)
    keep = st.lists(st.sampled_from(list(COLUMN_KINDS)), min_size=K_MAX, max_size=K_MAX)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    cfg = CovarianceConfig(lambda_range=draw(st.sampled_from([0.0, 0.3]) | st.floats(1e-3, 10.0)),
                           beta=draw(st.sampled_from([0.0, 0.3]) | st.floats(0.0, 0.99)), shrinkage=draw(alpha))
    a, rank_a = _factor(gen, b, n, draw(st.integers(0, K_MAX)), draw(cols), draw(keep))
    bf, rank_b = _factor(gen, b, n, draw(st.integers(0, K_MAX)), draw(cols), draw(keep))
    rank_s = draw(st.integers(0, L))
    r_samp = _sample_cov(gen, b, n, rank_s, draw(st.lists(log_scale, min_size=L, max_size=L)), draw(skews))
    case = Case(a.to(dtype), bf.to(dtype), r_samp.to(dtype), cfg, rank_a, rank_b, rank_s)
    assume(case.rank_pred_bound > 0)  # a zero R_pred is the ZeroTraceError case, tested on its own
    return case


def shrinkage(dtype: torch.dtype):
    """alpha > 0, down to the smallest loading the dtype resolves for the largest N: alpha/N above the
    rounding bound EIG_ABS (below it the loading is lost in rounding and no bound can be checked)."""
    return st.sampled_from([1e-3, 0.1]) | st.floats(2 * N_PROJECT * eig_abs(dtype), 0.9)


# ----------------------------------------------------------------------------- properties
def _eigvals(R: torch.Tensor) -> torch.Tensor:
    """Exact (complex128) eigenvalues, ascending, of the matrix the builder returned (Hermitian part)."""
    return torch.linalg.eigvalsh(hermitise(R.to(torch.complex128)))


def numerical_rank(lam: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Eigenvalues above the builder's rounding bound (lam: eigenvalues of a trace-1 output)."""
    return (lam > eig_abs(dtype)).sum(-1)


def check_basic(name: str, R: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Hermitian, trace 1, PSD within tolerance; returns the eigenvalues (ascending)."""
    n = R.shape[-1]
    assert R.dtype == dtype, f"{name}: dtype {R.dtype}, expected {dtype}"
    herm = (torch.linalg.matrix_norm(R - R.mH) / torch.linalg.matrix_norm(R)).max().item()
    assert herm <= herm_rtol(dtype), f"{name} not Hermitian: ||R - R^H||_F / ||R||_F = {herm:.3g} > {herm_rtol(dtype):.3g}"
    tr = torch.diagonal(R, dim1=-2, dim2=-1).sum(-1)
    dev = (tr - 1).abs().max().item()
    assert dev <= trace_tol(dtype, n), f"{name} trace off by {dev:.3g} > {trace_tol(dtype, n):.3g} (values {tr.tolist()})"
    lam = _eigvals(R)
    worst = lam[..., 0].min().item()
    assert worst >= -eig_abs(dtype), f"{name} not PSD: lambda_min = {worst:.3g} < -{eig_abs(dtype):.3g}"
    return lam


def check_builder(build: Builder, case: Case) -> dict[str, torch.Tensor]:
    """The builder's properties for any valid input; returns the eigenvalues of pred, blend and eff."""
    dtype = case.A.dtype
    cov = build(case.A, case.Bf, case.R_samp, case.cfg)
    lam = {name: check_basic(f"R_{name}", getattr(cov, name), dtype) for name in ("pred", "blend", "eff")}
    rank_pred = numerical_rank(lam["pred"], dtype).max().item()
    rank_blend = numerical_rank(lam["blend"], dtype).max().item()
    assert rank_pred <= case.rank_pred_bound, f"rank(R_pred) = {rank_pred} > rank(A) + rank(B) = {case.rank_pred_bound}"
    assert rank_blend <= case.rank_blend_bound, (
        f"rank(R_blend) = {rank_blend} > rank(R_pred) + rank(R_samp) = {case.rank_blend_bound}")
    return lam


def check_shrinkage(lam_blend: torch.Tensor, lam_eff: torch.Tensor, case: Case) -> int:
    """alpha > 0: bounded conditioning, eigenvalues moved by an affine map (no gap widened), tied noise
    eigenvalues. Returns the size of the tied noise cluster."""
    n, alpha, dtype = case.n, case.cfg.shrinkage, case.A.dtype
    tol, rel = eig_abs(dtype), eig_rel(dtype, n)
    floor, top = alpha / n * (1 - rel) - tol, (1 - alpha + alpha / n) * (1 + rel) + tol
    assert floor > 0, f"alpha = {alpha} is below what {dtype} resolves at N = {n}: the strategy must not draw it"
    lam_min, lam_max = lam_eff[..., 0], lam_eff[..., -1]
    assert bool((lam_min >= floor).all()), f"lambda_min {lam_min.tolist()} < alpha/N - tol = {floor:.6g}"
    assert bool((lam_max <= top).all()), f"lambda_max {lam_max.tolist()} > 1 - alpha + alpha/N + tol = {top:.6g}"
    cond = lam_max / lam_min
    assert bool((cond <= top / floor).all()), f"cond {cond.tolist()} > (1 - a + a/N)/(a/N) (+ tol) = {top / floor:.6g}"
    expected = (1 - alpha) * lam_blend + alpha / n
    moved = ((lam_eff - expected).abs() - rel * expected.abs()).max().item()
    assert moved <= 2 * tol, f"shrinkage is not the affine map of eigenvalues (no gap may widen): off by {moved:.3g}"
    cluster = ((lam_eff - alpha / n).abs() <= tol + rel * alpha / n).sum(-1).min().item()
    assert cluster >= n - case.rank_blend_bound, f"noise cluster {cluster} < N - rank bound = {n - case.rank_blend_bound}"
    if cluster >= 2:  # conditioning is bounded, yet the smallest eigengap is a tie
        gap = lam_eff.diff(dim=-1).amin(-1).max().item()
        assert gap <= 2 * (tol + rel * alpha / n), f"tied noise cluster of {cluster}, yet min gap {gap:.3g}"
    return cluster


@pytest.mark.parametrize("dtype", DTYPES)
@PROPS
@given(data=st.data())
def test_builder_properties_without_shrinkage(dtype, data):
    case = data.draw(cases(dtype))
    lam = check_builder(build_covariances, case)
    assert torch.equal(lam["eff"], lam["blend"]), "alpha = 0 must leave R_blend untouched"


@pytest.mark.parametrize("dtype", DTYPES)
@PROPS
@given(data=st.data())
def test_builder_properties_with_shrinkage(dtype, data):
    case = data.draw(cases(dtype, alpha=shrinkage(dtype)))
    lam = check_builder(build_covariances, case)
    cluster = check_shrinkage(lam["blend"], lam["eff"], case)
    note(f"tied noise cluster: {cluster} of N = {case.n}")
    event(f"N={case.n}: noise cluster {'>= 2 (tied)' if cluster >= 2 else '< 2'}")


@st.composite
def generic_cases(draw, dtype: torch.dtype) -> Case:
    """Orthonormal factor columns and a unit-scale R_samp, total rank <= N/2: subspaces in general position."""
    n = draw(st.sampled_from(SIZES))
    rank_a, rank_b, rank_s = draw(st.integers(1, K_MAX)), draw(st.integers(0, K_MAX)), draw(st.integers(0, L))
    assume(rank_a + rank_b + rank_s <= n // 2)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    basis = torch.linalg.qr(torch.randn(1, n, rank_a + rank_b, dtype=torch.complex128, generator=gen))[0]
    pad = lambda u: torch.cat([u, u.new_zeros(1, n, K_MAX - u.shape[-1])], -1)  # noqa: E731
    cfg = CovarianceConfig(lambda_range=draw(st.floats(0.05, 10.0)), beta=draw(st.floats(0.05, 0.99)))
    r_samp = _sample_cov(gen, 1, n, rank_s, [0.0] * L, 0.0)
    return Case(pad(basis[..., :rank_a]).to(dtype), pad(basis[..., rank_a:]).to(dtype), r_samp.to(dtype), cfg,
                rank_a, rank_b, rank_s)


@pytest.mark.parametrize("dtype", DTYPES)
@PROPS
@given(data=st.data())
def test_rank_adds_for_generic_inputs(dtype, data):
    """In general position the ranks add exactly: both factors and R_samp really enter R_blend."""
    case = data.draw(generic_cases(dtype))
    cov = build_covariances(case.A, case.Bf, case.R_samp, case.cfg)
    assert numerical_rank(_eigvals(cov.pred), dtype).item() == case.rank_pred_bound
    assert numerical_rank(_eigvals(cov.blend), dtype).item() == case.rank_blend_bound


def test_shrinkage_at_project_defaults_ties_118_noise_eigenvalues(record_property):
    """N = 144, rank(R_pred) = 2 K_MAX = 10, rank(R_samp) = L = 16: 118 noise eigenvalues, one tie."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.complex64, torch.complex128):
        for alpha in (1e-3, 0.1):
            a, ra = _factor(gen, 2, N_PROJECT, K_MAX, [0.0] * K_MAX, ["full"] * K_MAX)
            bf, rb = _factor(gen, 2, N_PROJECT, K_MAX, [0.0] * K_MAX, ["full"] * K_MAX)
            rs = _sample_cov(gen, 2, N_PROJECT, L, [0.0] * L, 0.0)
            case = Case(a.to(dtype), bf.to(dtype), rs.to(dtype), CovarianceConfig(shrinkage=alpha), ra, rb, L)
            lam = check_builder(build_covariances, case)
            assert numerical_rank(lam["blend"], dtype).tolist() == [26, 26]
            cluster = check_shrinkage(lam["blend"], lam["eff"], case)
            assert cluster == N_PROJECT - 2 * K_MAX - L == 118
            cond = (lam["eff"][..., -1] / lam["eff"][..., 0]).max().item()
            assert cond <= (1 - alpha + alpha / N_PROJECT) / (alpha / N_PROJECT) * (1 + 1e-3)
            # The tie as the eigh backward sees it: closer than THE tie rule (ris_stability.spectral.tie_rtol,
            # used by ris_model/numerics.py and ris_stability/numerics/tolerances.py alike).
            rel_gap = (lam["eff"].diff(dim=-1) / lam["eff"][..., -1:]).amin(-1).max().item()
            assert rel_gap <= tie_rtol(N_PROJECT, dtype)
            record_property(f"cluster_{dtype}_{alpha}", cluster)
            logger.info("%s alpha=%g: cond(R_eff)=%.3g, tied noise cluster=%d", dtype, alpha, cond, cluster)


# ----------------------------------------------------------------------------- zero trace
def _zero_trace_input(kind: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    a, _ = _factor(gen, 2, 24, K_MAX, [0.0] * K_MAX, ["full"] * K_MAX)
    bf, _ = _factor(gen, 2, 24, K_MAX, [0.0] * K_MAX, ["full"] * K_MAX)
    rs = _sample_cov(gen, 2, 24, L, [0.0] * L, 0.0)
    cfg = CovarianceConfig()
    if kind == "all factors zero":
        a, bf = torch.zeros_like(a), torch.zeros_like(bf)
    elif kind == "one batch item zero":
        a[1], bf[1] = 0, 0
    elif kind == "angle zero, range weight 0":
        a, cfg = torch.zeros_like(a), CovarianceConfig(lambda_range=0.0)
    elif kind == "R_samp = 0 at beta = 1":
        rs, cfg = torch.zeros_like(rs), CovarianceConfig(beta=1.0)
    elif kind == "factors underflow":
        a, bf = a * 1e-25, bf * 1e-25  # |a|^2 ~ 1e-50: zero in float32, a normal number in float64
    return a.to(dtype), bf.to(dtype), rs.to(dtype), cfg


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, matrix, item", [
    ("all factors zero", "R_pred", "[0, 1]"),
    ("one batch item zero", "R_pred", "[1]"),
    ("angle zero, range weight 0", "R_pred", "[0, 1]"),
    ("R_samp = 0 at beta = 1", "R_blend", "[0, 1]"),
], ids=lambda v: str(v))
def test_zero_trace_raises(dtype, kind, matrix, item):
    a, bf, rs, cfg = _zero_trace_input(kind, dtype)
    with pytest.raises(ZeroTraceError, match=rf"{matrix}: trace is zero .* item\(s\) {re.escape(item)} "):
        build_covariances(a, bf, rs, cfg)


def test_underflowing_factors_are_zero_trace_in_complex64_only():
    a, bf, rs, cfg = _zero_trace_input("factors underflow", torch.complex64)
    with pytest.raises(ZeroTraceError, match="R_pred"):
        build_covariances(a, bf, rs, cfg)
    a, bf, rs, cfg = _zero_trace_input("factors underflow", torch.complex128)
    cov = build_covariances(a, bf, rs, cfg)
    check_basic("R_pred", cov.pred, torch.complex128)


# ----------------------------------------------------------------------------- planted bugs
def _builder(hermitise_fn=hermitise, normalise_pred=True, shrink_fn=shrink) -> Builder:
    """The builder's recipe with one step replaceable, to plant the bugs the properties must catch."""
    def build(fa, fr, r_samp, cfg):
        pred = hermitise_fn(outer(fa) + cfg.lambda_range * outer(fr))
        pred = trace_normalise(pred, "R_pred") if normalise_pred else pred
        blend = trace_normalise(hermitise_fn((1 - cfg.beta) * pred + cfg.beta * r_samp.to(fa.dtype)), "R_blend")
        return Covariances(pred=pred, blend=blend, eff=shrink_fn(blend, cfg.shrinkage))
    return build


PLANTED = {  # bug -> the property that must catch it
    "forgets to Hermitise": (_builder(hermitise_fn=lambda r: r), "not Hermitian"),
    "Hermitises with .mT (no conjugate)": (_builder(hermitise_fn=lambda r: 0.5 * (r + r.mT)), "rank(R_pred)"),
    "forgets to trace-normalise R_pred": (_builder(normalise_pred=False), "R_pred trace off"),
    "shrinks towards alpha I, not alpha tr(R)/N I": (_builder(
        shrink_fn=lambda r, a: r if a == 0 else (1 - a) * r + a * torch.eye(r.shape[-1], dtype=r.dtype)),
        "R_eff trace off"),
}


def _violation(build: Builder, case: Case) -> str:
    """The first broken property's message, or '' when all hold."""
    try:
        lam = check_builder(build, case)
        if case.cfg.shrinkage > 0:
            check_shrinkage(lam["blend"], lam["eff"], case)
    except AssertionError as err:
        return str(err)
    return ""


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_is_caught(bug):
    """Hypothesis searches for an input on which the buggy builder breaks a property; the real builder
    must satisfy the properties on that very input (so the property, not the input, tells them apart)."""
    buggy, caught_by = PLANTED[bug]
    dtype = torch.complex64
    strategy = cases(dtype, alpha=shrinkage(dtype) if "shrink" in bug else st.just(0.0))
    found = find(strategy, lambda c: caught_by in _violation(buggy, c), settings=FIND)
    assert _violation(build_covariances, found) == "", f"the real builder also fails on {found!r}"
    logger.info("planted bug %r caught on %r: %s", bug, found, _violation(buggy, found))


def test_inference_matrix_is_the_shrunk_blend():
    gen = torch.Generator().manual_seed(2)
    a, _ = _factor(gen, 1, 24, K_MAX, [0.0] * K_MAX, ["full"] * K_MAX)
    rs = _sample_cov(gen, 1, 24, L, [0.0] * L, 0.0)
    for alpha in (0.0, 0.1):
        cov = build_covariances(a, a, rs, dataclasses.replace(CovarianceConfig(), shrinkage=alpha))
        assert inference_matrix(cov) is cov.eff
        assert (cov.eff is cov.blend) == (alpha == 0)
