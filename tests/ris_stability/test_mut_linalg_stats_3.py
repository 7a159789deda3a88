"""The finer points of the spectrum statistics (numerics/spectrum.py, numerics/stats.py) by hand: a cluster of
near-tied values and its mid-point, the first of two equal clusters, tolerances on the scale of what is compared
(s^2 for singular values), the condition on the numerical range, a signal dimension out of range or per sample,
batched eig backward terms and non-normality of matrices past the broadcast-product size."""
from __future__ import annotations

import math

import pytest
import torch

from ris_stability.numerics.stats import eig_backward_terms, eig_stats, eigen_stats, singular_stats, to_floats

D = torch.float64
NAN = float("nan")
ULP = 2.0 ** -52  # float64's spacing at 1


def _check(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=0, nan_ok=True), (key, got[key], value)


def test_a_chain_of_near_ties_is_one_cluster_reported_at_its_mid_point():
    """1, 1 + 4 ulp, 1 + 8 ulp, 3: each step is far below the tie tolerance (16 eps x scale), so the three form one
    cluster, whose value is the mid-point of its ends, 1 + 4 ulp (not an end, not the next value)."""
    vals = torch.tensor([1.0, 1.0 + 4 * ULP, 1.0 + 8 * ULP, 3.0], dtype=D)
    got = to_floats(eigen_stats(vals))
    assert got["max_cluster"] == 3 and got["cluster_value"] == 1.0 + 4 * ULP
    assert got["min_gap"] == 4 * ULP and got["amplification"] == 1 / (4 * ULP)
    shifted = to_floats(eigen_stats(torch.tensor([-2.0, 1.0, 1.0 + 4 * ULP, 1.0 + 8 * ULP], dtype=D)))
    assert shifted["max_cluster"] == 3 and shifted["cluster_value"] == 1.0 + 4 * ULP


def test_of_two_equally_long_clusters_the_first_is_reported():
    got = to_floats(eigen_stats(torch.tensor([1.0, 1.0, 5.0, 5.0], dtype=D)))
    assert got["max_cluster"] == 2 and got["cluster_value"] == 1.0
    later = to_floats(eigen_stats(torch.tensor([1.0, 5.0, 5.0, 6.0, 6.0, 6.0], dtype=D)))
    assert later["max_cluster"] == 3 and later["cluster_value"] == 6.0


def test_singular_value_ties_are_judged_on_the_scale_of_s_squared():
    """s = 100 and 100 (1 + 2 ulp): their squares differ by about 4e-12, a tie on the scale s_max^2 = 1e4 (tolerance
    about 3.6e-11), not on the scale s_max (3.6e-13); eigenvalues that far apart on a scale of 100 are no tie."""
    s = torch.tensor([100.0 * (1 + 2 * ULP), 100.0], dtype=D)
    got = to_floats(singular_stats(s))
    assert got["max_cluster"] == 2 and got["cluster_value"] == pytest.approx(100.0, rel=1e-15)
    squares = to_floats(eigen_stats(torch.tensor([1e4, 1e4 + 5e-12], dtype=D)))
    apart = to_floats(eigen_stats(torch.tensor([1e4, 1e4 + 5e-10], dtype=D)))
    assert squares["max_cluster"] == 2 and apart["max_cluster"] == 1


@pytest.mark.parametrize("stats", [eigen_stats, singular_stats], ids=["eigenvalues", "singular values"])
def test_condition_on_the_numerical_range(stats):
    """log10(max / smallest value above the rank tolerance): 5 / 2 for a spectrum with a numerical zero (whose
    cond is inf); NaN when every value is zero."""
    vals = torch.tensor([1e-20, 2.0, 5.0], dtype=D)
    got = to_floats(stats(vals if stats is eigen_stats else vals.flip(0)))
    _check(got, {"rank": 2, "cond": math.inf, "range_log10_cond": math.log10(2.5), "lambda_min": 1e-20,
                 "lambda_max": 5.0})
    zero = to_floats(stats(torch.zeros(3, dtype=D)))
    assert zero["rank"] == 0 and math.isnan(zero["range_log10_cond"]) and zero["cond"] == math.inf


@pytest.mark.parametrize("k, split, signal, noise", [
    (0, NAN, NAN, 1.0),      # no signal: every gap is noise
    (9, NAN, 1.0, NAN),      # more than n: every gap is signal
    (-1, NAN, NAN, 1.0),     # below 0: as 0
    (3, 1.0, 4.0, NAN),      # 1 | 2, 7, 11: the split after the smallest value
], ids=["k=0", "k>n", "k<0", "k=n-1"])
def test_a_signal_dimension_out_of_range_is_clamped(k, split, signal, noise):
    """Eigenvalues 1, 2, 7, 11 (gaps 1, 5, 4): k is clamped to [0, n]."""
    got = to_floats(eigen_stats(torch.tensor([1.0, 2.0, 7.0, 11.0], dtype=D), k=k))
    _check(got, {"gap_split": split, "min_gap_signal": signal, "min_gap_noise": noise})


def test_a_per_sample_signal_dimension_splits_each_sample():
    vals = torch.tensor([[1.0, 2.0, 7.0, 11.0], [1.0, 2.0, 7.0, 11.0]], dtype=D)  # gaps 1, 5, 4
    stats = eigen_stats(vals, k=torch.tensor([1, 3]))
    """k = 1 for the first sample (split 7 | 11, noise gaps 1, 5), k = 3 for the second (split 1 | 2, signal 5, 4)."""
    got = [dict(zip(stats, row)) for row in zip(*(v.tolist() for v in stats.values()))]
    _check(got[0], {"gap_split": 4.0, "min_gap_signal": NAN, "min_gap_noise": 1.0})
    _check(got[1], {"gap_split": 1.0, "min_gap_signal": 4.0, "min_gap_noise": NAN})


def test_eig_backward_terms_of_a_batch_by_hand():
    """Two samples, V = I: the gap terms |g_ij / (w_j - w_i)| and the phase noise |Im g_ii| of each sample."""
    w = torch.tensor([[1.0, 3.0], [2.0, 2.5j]], dtype=torch.complex128)
    gV = torch.tensor([[[0.1j, 2.0], [4.0, -0.3j]], [[0.0, 1.0], [0.5, 0.2j]]], dtype=torch.complex128)
    noise, terms = eig_backward_terms(w, torch.eye(2, dtype=torch.complex128).repeat(2, 1, 1), gV)
    gap = abs(2.5j - 2.0)
    assert noise.tolist() == pytest.approx([0.3, 0.2]) and terms.tolist() == pytest.approx([2.0, 1.0 / gap])


def test_non_normality_past_the_broadcast_product_size():
    """A 40 x 40 shift matrix plus a diagonal (beyond the size where a broadcast product is used): ||A A^T - A^T A||
    / ||A||^2 as computed with plain matmuls; a diagonal matrix is normal."""
    n = 40
    a = torch.diag(torch.arange(1.0, n + 1, dtype=D)) + torch.diag(torch.ones(n - 1, dtype=D), 1)
    want = torch.linalg.matrix_norm(a @ a.T - a.T @ a) / torch.linalg.matrix_norm(a) ** 2
    got = to_floats(eig_stats(a))
    assert got["non_normal"] == pytest.approx(float(want), rel=1e-12) and got["non_normal"] > 1e-4
    assert got["rel_sep"] == pytest.approx(1 / n, rel=1e-9)
    assert to_floats(eig_stats(torch.diag(torch.arange(1.0, n + 1, dtype=D))))["non_normal"] == 0
