"""Spectral statistics at their edges, as a user calling them sees them: a 1x1 spectrum, a signal dimension
outside [0, n], a gap exactly at THE tie rule's tolerance, a rank-1 spectrum's range condition number, and the
words of the errors on inputs the statistics are not defined on."""

from __future__ import annotations

import math

import pytest
import torch

from ris_stability.numerics.stats import SpectrumError, eigen_stats, matrix_stats


def _floats(stats: dict) -> dict:
    return {k: float(v) for k, v in stats.items()}


def test_a_one_by_one_spectrum_has_its_value_and_no_gaps() -> None:
    s = _floats(eigen_stats(torch.tensor([2.0])))
    assert (s["n"], s["rank"], s["lambda_min"], s["lambda_max"], s["trace"], s["cond"]) == (1, 1, 2, 2, 2, 1)
    assert s["max_cluster"] == 1 and all(math.isnan(s[k]) for k in ("min_gap", "gap_split", "cluster_value"))


@pytest.mark.parametrize("k, signal, noise", [(5, 1.0, math.nan), (3, 1.0, math.nan), (-1, math.nan, 1.0),
                                              (0, math.nan, 1.0), (1, math.nan, 1.0)])
def test_a_signal_dimension_outside_the_spectrum_is_clamped_to_it(k, signal, noise) -> None:
    """k >= n: every value is signal; k <= 0: every value is noise (gaps of 1 between 1, 2, 3)."""
    s = _floats(eigen_stats(torch.tensor([1.0, 2.0, 3.0]), k=k))
    for key, want in (("min_gap_signal", signal), ("min_gap_noise", noise)):
        assert (math.isnan(s[key]) and math.isnan(want)) or s[key] == want, (k, key, s[key])
    assert (s["gap_split"] == 1.0) == (k == 1)


def test_a_gap_exactly_at_the_tie_tolerance_is_a_tie() -> None:
    """THE tie rule, 2 max(n, 8) eps max|x| = 2**-48 here: a gap equal to it ties the pair, twice it does not."""
    tied = eigen_stats(torch.tensor([-1.0, -1.0 + 2.0 ** -48], dtype=torch.float64))
    apart = eigen_stats(torch.tensor([-1.0, -1.0 + 2.0 ** -47], dtype=torch.float64))
    assert float(tied["max_cluster"]) == 2 and float(apart["max_cluster"]) == 1


def test_a_rank_one_spectrum_has_a_range_condition_number_of_one() -> None:
    s = _floats(eigen_stats(torch.tensor([0.0, 0.0, 5.0])))
    assert s["rank"] == 1 and s["range_log10_cond"] == 0.0 and math.isinf(s["cond"])


@pytest.mark.parametrize("bad, words", [
    (torch.zeros(0), "eigen_stats: expected a (..., n) tensor with n >= 1, got shape (0,); pass the "
                     "eigenvalues/singular values of at least one 1x1 matrix"),
    (torch.tensor(1.0), "eigen_stats: expected a (..., n) tensor with n >= 1, got shape (); pass the "
                        "eigenvalues/singular values of at least one 1x1 matrix"),
    (torch.ones(2, dtype=torch.complex64), "eigen_stats: got complex values of dtype torch.complex64; pass the real "
     "eigenvalues of a Hermitian matrix (torch.linalg.eigvalsh) or singular values (torch.linalg.svdvals)"),
])
def test_a_spectrum_the_statistics_are_not_defined_on_is_refused_in_words(bad, words) -> None:
    with pytest.raises(SpectrumError) as err:
        eigen_stats(bad)
    assert str(err.value) == words


def test_a_rectangular_matrix_is_refused_with_the_call_that_fits_it() -> None:
    with pytest.raises(SpectrumError) as err:
        matrix_stats(torch.ones(2, 3))
    assert str(err.value) == ("matrix_stats: expected square matrices (..., n, n), got shape (2, 3); use "
                              "singular_stats(torch.linalg.svdvals(A)) for rectangular matrices")
