"""Spectral statistics: planted spectra Q diag(lambda) Q^H are recovered within dtype tolerance."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ris_stability.numerics.stats import (
    SPECTRUM_KEYS, STAT_KEYS, SpectrumError, eigen_stats, hermitian_error, matrix_stats, singular_stats, to_floats, worst,
)
from ris_stability.numerics.tolerances import ToleranceError, eig_abs_err, eps_of, rank_tol, tie_tol

DTYPES = [torch.complex64, torch.complex128]
SETTINGS = settings(deadline=None, max_examples=30)


def random_unitary(n: int, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(n, n, dtype=torch.complex128, generator=gen)
    q, r = torch.linalg.qr(z)
    # Fix the phases of R's diagonal so Q is Haar-distributed rather than biased by the QR convention.
    return q * (r.diagonal() / r.diagonal().abs()).unsqueeze(-2)


def planted(lams: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Q diag(lams) Q^H formed in complex128 (exactly Hermitian), then rounded once to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    q = random_unitary(lams.shape[-1], gen)
    a = (q * lams.to(torch.complex128)) @ q.mH
    return ((a + a.mH) / 2).to(dtype)


@st.composite
def tied_spectra(draw):
    """Ascending float64 spectrum with planted rank r, a tied cluster of size c and well-separated rest."""
    n = draw(st.integers(4, 12))
    r = draw(st.integers(1, n))
    c = draw(st.integers(1, r))
    distinct = r - c + 1
    # Distinct nonzero levels in [0.1, 1], spaced >= 0.9 / 12: far above any tie tolerance.
    levels = torch.linspace(0.1, 1.0, distinct, dtype=torch.float64) if distinct > 1 else torch.ones(1, dtype=torch.float64)
    tied_at = draw(st.integers(0, distinct - 1))
    nonzero = torch.cat([levels, levels[tied_at].repeat(c - 1)])
    lams = torch.sort(torch.cat([torch.zeros(n - r, dtype=torch.float64), nonzero])).values
    k = draw(st.integers(0, n))
    return lams, k, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(tied_spectra())
def test_planted_rank_ties_and_gaps_are_recovered(case):
    lams, k, dtype, seed = case
    n = lams.shape[0]
    got = to_floats(matrix_stats(planted(lams, dtype, seed), k=k))
    want = to_floats(eigen_stats(lams, k=k, dtype=dtype))  # the exact spectrum is the oracle
    gap_tol = tie_tol(n, dtype, 1.0)
    assert got["rank"] == want["rank"] == float(int((lams > 0).sum()))
    assert got["max_cluster"] == want["max_cluster"]
    assert got["n"] == n
    for key in ("min_gap", "gap_split", "min_gap_signal", "min_gap_noise", "lambda_min", "lambda_max",
                "cluster_value"):
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert abs(got[key] - want[key]) <= gap_tol, (key, got[key], want[key])
    assert abs(got["trace"] - want["trace"]) <= n * gap_tol
    assert got["herm_err"] <= 4 * eps_of(dtype)
    if want["rank"] < n:
        assert got["cond"] == math.inf and got["log10_cond"] == math.inf


@st.composite
def conditioned_spectra(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(2, 12))
    log10_cond = draw(st.floats(0.5, 4.0 if dtype == torch.complex64 else 10.0))
    return n, 10.0 ** log10_cond, dtype, draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(conditioned_spectra())
def test_planted_condition_number_is_recovered(case):
    n, cond, dtype, seed = case
    lams = torch.logspace(-math.log10(cond), 0.0, n, dtype=torch.float64)
    got = to_floats(matrix_stats(planted(lams, dtype, seed)))
    # lambda_min carries an absolute error of n*eps*lambda_max, i.e. a relative error of n*eps*cond.
    rtol = 2 * eig_abs_err(n, dtype, cond)
    assert got["cond"] == pytest.approx(cond, rel=rtol)
    assert got["rank"] == n
    assert got["max_cluster"] == 1 and math.isnan(got["cluster_value"])
    assert got["amplification"] == pytest.approx(1.0 / float((lams[1:] - lams[:-1]).min()), rel=rtol)


@SETTINGS
@given(st.sampled_from(DTYPES), st.integers(2, 10), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_planted_singular_values_are_recovered(dtype, rows, r, seed):
    cols = rows + 3
    r = min(r, rows)
    gen = torch.Generator().manual_seed(seed)
    s = torch.zeros(rows, dtype=torch.float64)
    s[:r] = torch.linspace(1.0, 0.2, r, dtype=torch.float64)
    u = random_unitary(rows, gen)
    v = random_unitary(cols, gen)[:, :rows]
    a = ((u * s.to(torch.complex128)) @ v.mH).to(dtype)
    got = to_floats(singular_stats(torch.linalg.svdvals(a), k=1))
    want = to_floats(singular_stats(s, k=1, dtype=dtype))
    assert got["rank"] == r
    assert got["max_cluster"] == want["max_cluster"] == max(1, rows - r)
    assert got["cond"] == (math.inf if r < rows else pytest.approx(5.0, rel=1e-3))
    assert got["lambda_max"] == pytest.approx(1.0, abs=eig_abs_err(rows, dtype, 4.0))
    # The svd backward divides by s_i^2 - s_j^2: the top split gap is 1 - s_2^2, not 1 - s_2.
    if r >= 2:
        assert got["gap_split"] == pytest.approx(1.0 - float(s[1]) ** 2, abs=tie_tol(rows, dtype, 4.0))


def test_exactly_tied_spectrum_has_zero_gap_and_infinite_amplification():
    got = to_floats(worst(eigen_stats(torch.tensor([[1e-3] * 5 + [0.2, 0.5]]), k=2)))
    assert got["min_gap"] == 0.0 and got["amplification"] == math.inf
    assert got["max_cluster"] == 5.0 and got["cluster_value"] == pytest.approx(1e-3)
    assert got["gap_split"] == pytest.approx(0.199) and got["min_gap_noise"] == 0.0
    assert got["min_gap_signal"] == pytest.approx(0.3)
    assert got["cond"] == pytest.approx(500.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identity_is_one_cluster_of_size_n(dtype):
    got = to_floats(matrix_stats(planted(torch.ones(8, dtype=torch.float64), dtype, 3)))
    assert got["max_cluster"] == 8 and got["cond"] == pytest.approx(1.0, rel=1e-5)
    assert got["cluster_value"] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("k, gap_split, signal, noise", [
    (0, math.nan, math.nan, 1.0),
    (1, 4.0, math.nan, 1.0),
    (2, 2.0, 4.0, 1.0),
    (3, 1.0, 2.0, math.nan),
    (4, math.nan, 1.0, math.nan),
    (9, math.nan, 1.0, math.nan),
], ids=["k0", "k1", "k2", "k3", "k_n", "k_above_n"])
def test_signal_split_gaps_by_k(k, gap_split, signal, noise):
    got = to_floats(eigen_stats(torch.tensor([0.0, 1.0, 3.0, 7.0], dtype=torch.float64), k=k))
    for key, want in (("gap_split", gap_split), ("min_gap_signal", signal), ("min_gap_noise", noise)):
        assert (math.isnan(got[key]) and math.isnan(want)) or got[key] == want, (key, got[key])


def test_per_sample_k_tensor_and_unknown_k():
    ev = torch.tensor([[0.0, 1.0, 3.0, 7.0], [0.0, 1.0, 3.0, 7.0]], dtype=torch.float64)
    per = eigen_stats(ev, k=torch.tensor([1, 2]))
    assert per["gap_split"].tolist() == [4.0, 2.0]
    unknown = eigen_stats(ev)
    assert torch.isnan(unknown["gap_split"]).all() and torch.isnan(unknown["min_gap_signal"]).all()
    assert unknown["min_gap"].tolist() == [1.0, 1.0]


def test_hermitian_error_of_known_skew_part():
    h = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    skew = torch.tensor([[0.0, 0.5], [-0.5, 0.0]], dtype=torch.float64)
    want = torch.linalg.norm(2 * skew) / torch.linalg.norm(h + skew)
    assert hermitian_error(h + skew).item() == pytest.approx(want.item(), rel=1e-12)
    assert hermitian_error(h).item() == 0.0
    assert hermitian_error(torch.zeros(3, 3)).item() == 0.0


def test_non_finite_matrix_poisons_its_stats_and_the_worst_case():
    a = torch.eye(4, dtype=torch.complex64).repeat(3, 1, 1)
    a[1, 2, 2] = float("nan")
    stats = matrix_stats(a)
    assert torch.isnan(stats["rank"]).tolist() == [False, True, False]
    w = to_floats(worst(stats))
    assert w["n"] == 4.0 and all(math.isnan(v) for key, v in w.items() if key != "n")


def test_worst_reduces_each_key_to_its_worst_case():
    ev = torch.tensor([[1.0, 2.0, 2.0, 5.0], [0.0, 0.5, 3.0, 4.0], [1.0, 1.0, 1.0, 9.0]], dtype=torch.float64)
    w = to_floats(worst(eigen_stats(ev, k=1)))
    assert w["rank"] == 3.0 and w["cond"] == math.inf and w["lambda_min"] == 0.0
    assert w["lambda_max"] == 9.0 and w["min_gap"] == 0.0 and w["gap_split"] == 1.0
    assert w["max_cluster"] == 3.0 and w["cluster_value"] == 1.0
    assert set(w) == set(SPECTRUM_KEYS) - {"herm_err"}


def test_worst_ignores_undefined_gaps():
    per = eigen_stats(torch.tensor([[0.0, 1.0, 3.0], [0.0, 1.0, 3.0]]), k=torch.tensor([0, 1]))
    assert to_floats(worst(per))["gap_split"] == 2.0


def test_tolerances_follow_finfo():
    assert eps_of(torch.complex64) == torch.finfo(torch.float32).eps
    assert eps_of(torch.complex128) == torch.finfo(torch.float64).eps
    assert rank_tol(10, torch.float32, 2.0) == pytest.approx(10 * torch.finfo(torch.float32).eps * 2.0)
    assert tie_tol(2, torch.float64, 1.0) == tie_tol(8, torch.float64, 1.0) == 16 * eps_of(torch.float64)
    with pytest.raises(ToleranceError, match="int64"):
        eps_of(torch.int64)


@pytest.mark.parametrize("call, match", [
    (lambda: eigen_stats(torch.zeros(3, 0)), "n >= 1"),
    (lambda: eigen_stats(torch.zeros(3, dtype=torch.complex64)), "complex"),
    (lambda: matrix_stats(torch.zeros(3, 4)), "square"),
    (lambda: to_floats({"rank": torch.zeros(2)}), "worst"),
], ids=["empty", "complex-eigenvalues", "rectangular", "unreduced-batch"])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(SpectrumError, match=match):
        call()


def test_segmented_worst_equals_worst_per_group():
    from ris_stability.numerics.stats import worst_segments
    torch.manual_seed(3)
    groups = []
    for b, tie in ((3, False), (1, False), (4, True)):
        a = torch.randn(b, 5, 5, dtype=torch.float64)
        r = a @ a.mT
        if tie:  # a tied cluster of 3 in the third sample only
            r[2] = torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0], dtype=torch.float64))
        stats = matrix_stats(r, k=2)
        groups.append({key: stats.get(key, torch.full_like(stats["n"], math.nan)) for key in STAT_KEYS})
    groups[1] = {k: (v.clone().fill_(math.nan) if k == "lambda_max" else v) for k, v in groups[1].items()}
    rows = torch.cat([torch.stack([g[k] for k in STAT_KEYS], -1) for g in groups])
    segment = torch.cat([torch.full((g["n"].shape[0],), i) for i, g in enumerate(groups)])
    table = worst_segments(rows, segment, len(groups))
    for i, g in enumerate(groups):
        want = to_floats(worst(g))
        assert dict(zip(STAT_KEYS, table[i].tolist())) == pytest.approx(want, nan_ok=True)
    assert table[2, STAT_KEYS.index("max_cluster")] == 3 and table[2, STAT_KEYS.index("cluster_value")] == 1.0
    assert math.isnan(table[1, STAT_KEYS.index("rank")])  # a broken spectrum poisons its own group only


def test_segmented_worst_one_row_per_group_equals_worst():
    """The one-row-per-group shortcut (a site called once) keeps worst()'s rules, whatever the order."""
    from ris_stability.numerics.stats import worst_segments
    torch.manual_seed(4)
    a = torch.randn(3, 4, 4, dtype=torch.float64)
    stats = matrix_stats(a @ a.mT, k=1)
    stats = {key: stats.get(key, torch.full_like(stats["n"], math.nan)) for key in STAT_KEYS}
    stats["lambda_max"][1] = math.nan  # a broken spectrum in the second row only
    rows = torch.stack([stats[k] for k in STAT_KEYS], -1)
    segment = torch.tensor([2, 0, 1])
    table = worst_segments(rows, segment, 3)
    for r, g in enumerate(segment.tolist()):
        want = to_floats(worst({k: v[r:r + 1] for k, v in stats.items()}))
        assert dict(zip(STAT_KEYS, table[g].tolist())) == pytest.approx(want, nan_ok=True)
    assert math.isnan(table[0, STAT_KEYS.index("rank")]) and table[0, STAT_KEYS.index("n")] == 4
    assert not math.isnan(table[2, STAT_KEYS.index("rank")])
