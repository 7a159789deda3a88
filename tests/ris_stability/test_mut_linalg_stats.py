"""The numbers a user reads per linear-algebra site (numerics/stats.py, numerics/spectrum.py), on spectra and
matrices small enough to work out by hand: rank, condition, gaps, the signal/noise split, clusters, the eig
hazards (Hermitian error, separation, non-normality), pinv's cut-off margin and the eig backward's two parts."""
from __future__ import annotations

import math

import pytest
import torch

from ris_stability.numerics.stats import (SpectrumError, eig_backward_terms, eig_stats, eigen_stats, hermitian_error,
                                          matrix_stats, pinv_cutoff_margin, singular_stats, to_floats, worst)

D = torch.float64
NAN = float("nan")


def _floats(stats) -> dict[str, float]:
    return to_floats(stats)


def _check(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, nan_ok=True), (key, got[key], value)


def test_a_pair_tie_by_hand():
    got = _floats(eigen_stats(torch.tensor([1.0, 2.0, 2.0, 5.0], dtype=D)))
    _check(got, {"n": 4, "rank": 4, "cond": 5, "log10_cond": math.log10(5), "lambda_min": 1, "lambda_max": 5,
                 "trace": 10, "min_gap": 0, "gap_split": NAN, "min_gap_signal": NAN, "min_gap_noise": NAN,
                 "max_cluster": 2, "cluster_value": 2, "amplification": math.inf})
    split = _floats(eigen_stats(torch.tensor([1.0, 2.0, 2.0, 5.0], dtype=D), k=1))
    _check(split, {"gap_split": 3, "min_gap_signal": NAN, "min_gap_noise": 0})


def test_a_rank_deficient_indefinite_spectrum_by_hand():
    got = _floats(eigen_stats(torch.tensor([-4.0, 1e-20, 2.0, 5.0], dtype=D), k=2))
    _check(got, {"n": 4, "rank": 3, "cond": math.inf, "log10_cond": math.inf, "lambda_min": -4, "lambda_max": 5,
                 "trace": 3, "min_gap": 2, "gap_split": 2, "min_gap_signal": 3, "min_gap_noise": 4,
                 "max_cluster": 1, "cluster_value": NAN, "amplification": 0.5})


def test_longest_cluster_and_its_value():
    got = _floats(eigen_stats(torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0, 7.0], dtype=D)))
    _check(got, {"max_cluster": 3, "cluster_value": 3, "min_gap": 0})
    spread = _floats(eigen_stats(torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=D)))
    _check(spread, {"max_cluster": 1, "cluster_value": NAN, "min_gap": 1, "amplification": 1})


def test_singular_values_in_svd_order():
    got = _floats(singular_stats(torch.tensor([5.0, 2.0, 2.0, 1.0], dtype=D)))
    _check(got, {"n": 4, "rank": 4, "cond": 5, "lambda_min": 1, "lambda_max": 5, "max_cluster": 2,
                 "cluster_value": 2, "min_gap": 0})
    deficient = _floats(singular_stats(torch.tensor([3.0, 1.0, 0.0], dtype=D), k=1))
    _check(deficient, {"rank": 2, "cond": math.inf, "lambda_min": 0, "lambda_max": 3})


def test_a_nonfinite_spectrum_is_nan_except_its_size():
    got = _floats(eigen_stats(torch.tensor([1.0, math.nan, 2.0], dtype=D)))
    assert got["n"] == 3 and all(math.isnan(v) for k, v in got.items() if k != "n")
    both = eigen_stats(torch.tensor([[1.0, 2.0, 3.0], [1.0, math.inf, 3.0]], dtype=D))
    assert math.isnan(_floats(worst(both))["min_gap"])  # the worst case of a batch with a non-finite sample


def test_worst_of_a_batch():
    stats = eigen_stats(torch.tensor([[1.0, 2.0, 4.0], [1.0, 1.0, 100.0]], dtype=D))
    got = _floats(worst(stats))
    _check(got, {"cond": 100, "min_gap": 0, "max_cluster": 2, "lambda_max": 100})


def test_matrix_stats_of_a_known_symmetric_matrix():
    a = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=D)  # eigenvalues 1 and 3
    got = _floats(matrix_stats(a))
    _check(got, {"n": 2, "rank": 2, "cond": 3, "lambda_min": 1, "lambda_max": 3, "trace": 4, "min_gap": 2,
                 "herm_err": 0})


def test_hermitian_error_of_complex_and_zero_matrices():
    a = torch.tensor([[1.0, 1j], [1j, 1.0]], dtype=torch.complex128)  # a - a^H = [[0, 2i], [2i, 0]]
    assert float(hermitian_error(a)) == pytest.approx(math.sqrt(8) / 2)
    h = torch.tensor([[1.0, 1j], [-1j, 1.0]], dtype=torch.complex128)
    assert float(hermitian_error(h)) == 0 and float(hermitian_error(torch.zeros(3, 3, dtype=D))) == 0


def test_eig_hazards_by_hand():
    upper = _floats(eig_stats(torch.tensor([[1.0, 1.0], [0.0, 3.0]], dtype=D)))  # eigenvalues 1, 3
    _check(upper, {"herm_err": math.sqrt(2) / math.sqrt(11), "rel_sep": 2 / 3, "non_normal": math.sqrt(10) / 11})
    normal = _floats(eig_stats(torch.tensor([[2.0, 0.0], [0.0, -3.0]], dtype=D)))
    _check(normal, {"herm_err": 0, "rel_sep": 5 / 3, "non_normal": 0})
    given = _floats(eig_stats(torch.eye(2, dtype=D), torch.tensor([1.0, 1.5], dtype=torch.complex128)))
    assert given["rel_sep"] == pytest.approx(0.5 / 1.5)  # the eigenvalues passed in are used
    one = _floats(eig_stats(torch.tensor([[2.0]], dtype=D)))
    assert math.isnan(one["rel_sep"])  # no pair
    zero = _floats(eig_stats(torch.zeros(2, 2, dtype=D)))
    assert math.isnan(zero["rel_sep"]) and zero["non_normal"] == 0


def test_pinv_cutoff_margin_by_hand():
    s = torch.tensor([1.0, 1e-3, 1e-16], dtype=D)
    cut = 3 * torch.finfo(D).eps  # default rtol max(m, n) * eps
    assert float(pinv_cutoff_margin(s, 3, 3, D)) == pytest.approx(abs(math.log10(1e-16 / cut)))
    assert float(pinv_cutoff_margin(s, 3, 5, D)) == pytest.approx(abs(math.log10(1e-16 / (5 * cut / 3))))
    assert float(pinv_cutoff_margin(s[:2], 3, 3, D, rtol=1e-2)) == pytest.approx(1.0)
    assert float(pinv_cutoff_margin(torch.tensor([1.0, 0.5], dtype=D), 2, 2, D, atol=0.1)) == pytest.approx(
        math.log10(5))
    assert float(pinv_cutoff_margin(torch.tensor([1.0, 0.0], dtype=D), 2, 2, D, rtol=1e-3)) == pytest.approx(3.0)
    assert math.isnan(float(pinv_cutoff_margin(torch.zeros(2, dtype=D), 2, 2, D)))


def test_eig_backward_terms_by_hand():
    w = torch.tensor([1.0, 3.0], dtype=torch.complex128)
    gV = torch.tensor([[0.1j, 2.0], [4.0, -0.3j]], dtype=torch.complex128)
    noise, terms = eig_backward_terms(w, torch.eye(2, dtype=torch.complex128), gV)
    assert float(noise) == pytest.approx(0.3)  # largest |Im diag(V^H gV)|
    assert float(terms) == pytest.approx(2.0)  # |4 / (1 - 3)| beats |2 / (3 - 1)|
    assert noise.dtype == D and terms.dtype == D


def test_bad_inputs():
    with pytest.raises(SpectrumError):
        to_floats({"min_gap": torch.zeros(2)})
    with pytest.raises(SpectrumError):
        eig_stats(torch.zeros(2, 3))
