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


# -- the contract of the statistics functions: device, dtype, messages --------------------------------------------
def test_statistics_stay_on_the_input_device():
    """Every statistic is computed where its input lives (no host copy, no device sync): on the meta device, which
    holds no data, a helper tensor made on the CPU would fail at once."""
    from ris_stability.linalg.site_stats import complex_gap_stats
    from ris_stability.numerics.stats import STAT_KEYS, worst_rows, worst_segments
    meta = torch.device("meta")
    vals = torch.empty(4, 3, dtype=D, device=meta)
    outs = [*eigen_stats(vals, k=1).values(), *singular_stats(vals, k=torch.ones(4, dtype=torch.long)).values(),
            *worst(eigen_stats(vals)).values(), *eig_stats(torch.empty(2, 3, 3, device=meta)).values(),
            *complex_gap_stats(torch.empty(2, 3, dtype=torch.complex64, device=meta), torch.float32).values(),
            hermitian_error(torch.empty(2, 3, 3, dtype=torch.complex64, device=meta)),
            pinv_cutoff_margin(vals, 3, 3, D)]
    rows = torch.empty(5, len(STAT_KEYS), dtype=D, device=meta)
    outs += [worst_rows(rows), worst_segments(rows, torch.tensor([0, 0, 1, 1, 1], device=meta), 2),
             worst_segments(rows, torch.tensor([4, 3, 2, 1, 0], device=meta), 5), worst_segments(rows, None, 5)]
    assert all(t.device == meta for t in outs)


@pytest.mark.parametrize("call, name", [
    (lambda: eigen_stats(torch.zeros(0, dtype=D)), "eigen_stats"),
    (lambda: singular_stats(torch.zeros(2, 0, dtype=D)), "singular_stats"),
    (lambda: eigen_stats(torch.ones(2, dtype=torch.complex128)), "eigen_stats"),
    (lambda: matrix_stats(torch.zeros(2, 3, dtype=D)), "matrix_stats"),
    (lambda: hermitian_error(torch.zeros(3, dtype=D)), "hermitian_error"),
    (lambda: eig_stats(torch.zeros(3, 2, dtype=D)), "eig_stats"),
    (lambda: to_floats({"cond": torch.zeros(2, dtype=D)}), "to_floats"),
])
def test_a_bad_input_is_refused_in_the_words_of_the_function_called(call, name):
    """The message starts with the function the user called, so the traceback's last line says which call was wrong."""
    with pytest.raises(SpectrumError) as err:
        call()
    assert str(err.value).startswith(name + ":"), str(err.value)
    if name.startswith("to_floats"):
        assert str(err.value).endswith("; reduce the batch first with worst(stats)")


def test_tolerances_follow_the_dtype_of_the_matrix_not_of_its_eigenvalues():
    """Eigenvalues (1e-9, 1) kept in float64 but coming from a float32 matrix: 1e-9 is below float32's rank tolerance
    (rank 1, cond inf); read as float64 they are rank 2, cond 1e9."""
    vals = torch.tensor([1e-9, 1.0], dtype=D)
    assert _floats(eigen_stats(vals))["rank"] == 2 and _floats(eigen_stats(vals))["cond"] == pytest.approx(1e9)
    got = _floats(eigen_stats(vals, dtype=torch.float32))
    assert got["rank"] == 1 and got["cond"] == math.inf
    svals = torch.tensor([1.0, 1e-9], dtype=D)
    assert _floats(singular_stats(svals, dtype=torch.float32))["rank"] == 1 and _floats(singular_stats(svals))["rank"] == 2


def test_statistics_are_float64_whatever_the_input_precision():
    """float32 eigenvalues give float64 statistics summed in float64; worst and worst_rows of float32 statistics are
    float64; to_floats gives Python floats even for integer tensors."""
    from ris_stability.numerics.stats import STAT_KEYS, worst_rows
    vals = torch.tensor([1.0, 2.0 ** -30, 2.0 ** 24], dtype=torch.float32)
    stats = eigen_stats(vals)
    assert all(v.dtype == D for v in stats.values())
    assert float(stats["trace"]) == 1.0 + 2.0 ** -30 + 2.0 ** 24  # not rounded to float32
    assert all(v.dtype == D for v in worst({"cond": torch.tensor([3.0, 2.0])}).values())
    assert worst_rows(torch.ones(2, len(STAT_KEYS))).dtype == D
    got = to_floats({"rank": torch.tensor(3), "cond": torch.tensor(2.5, dtype=torch.float32)})
    assert got == {"rank": 3.0, "cond": 2.5} and type(to_floats({"rank": torch.tensor(3)})["rank"]) is float


# -- worst cases over a batch, from dicts and from stacked rows -----------------------------------------------------
def _rows(*dicts) -> torch.Tensor:
    from ris_stability.numerics.stats import STAT_KEYS
    return torch.tensor([[d.get(key, 1.0) for key in STAT_KEYS] for d in dicts], dtype=D)


def test_worst_rows_takes_the_cluster_value_of_the_largest_cluster_and_skips_undefined_entries():
    """Rows of three calls: the largest cluster (3, at 1.0) is reported with its own value, not the largest value
    (5.0); an undefined (NaN) Hermitian error or gap is skipped by max and by min; n is never poisoned."""
    from ris_stability.numerics.stats import STAT_KEYS, worst_rows
    rows = _rows({"n": 4, "max_cluster": 2, "cluster_value": 5.0, "herm_err": NAN, "min_gap": 0.5},
                 {"n": 4, "max_cluster": 3, "cluster_value": 1.0, "herm_err": 0.25, "min_gap": NAN},
                 {"n": 4, "max_cluster": 1, "cluster_value": NAN, "herm_err": NAN, "min_gap": 2.0})
    got = dict(zip(STAT_KEYS, worst_rows(rows).tolist()))
    _check(got, {"n": 4, "max_cluster": 3, "cluster_value": 1.0, "herm_err": 0.25, "min_gap": 0.5})
    assert got == pytest.approx(_floats(worst({k: rows[:, i] for i, k in enumerate(STAT_KEYS)})), nan_ok=True)
    some = ("n", "cluster_value", "min_gap")  # a subset of the columns without the cluster sizes: plain max / min
    assert worst_rows(rows[:, [STAT_KEYS.index(k) for k in some]], keys=some).tolist() == [4.0, 5.0, 0.5]
    broken = dict(zip(STAT_KEYS, worst_rows(torch.cat([rows, _rows({"n": 4, "lambda_max": NAN})])).tolist()))
    assert broken["n"] == 4 and all(math.isnan(v) for k, v in broken.items() if k != "n")


def test_worst_of_a_dict_skips_undefined_maxima_and_unsized_clusters():
    """worst of statistics given as a dict: a NaN in a max-reduced statistic is skipped (not read as +inf), and a
    sample whose cluster size is unknown is not the one whose cluster value is reported."""
    got = _floats(worst({"herm_err": torch.tensor([0.1, NAN], dtype=D), "amplification": torch.tensor([NAN, 2.0]),
                         "max_cluster": torch.tensor([NAN, 2.0], dtype=D),
                         "cluster_value": torch.tensor([7.0, 3.0], dtype=D)}))
    assert got == {"herm_err": 0.1, "amplification": 2.0, "max_cluster": 2.0, "cluster_value": 3.0}


def test_matrix_stats_poison_only_the_broken_matrix_and_never_its_size():
    """A (2, 2) batch of 2x2 matrices with an inf in one: that sample's statistics are NaN but n, the others are
    those of diag(1, 3), and the worst case of the batch is NaN but n."""
    a = torch.diag(torch.tensor([1.0, 3.0], dtype=D)).repeat(2, 2, 1, 1)
    a[1, 0, 0, 1] = math.inf
    stats = matrix_stats(a)
    assert stats["n"].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert stats["cond"][0].tolist() == [3.0, 3.0] and stats["cond"][1, 1] == 3.0 and math.isnan(stats["cond"][1, 0])
    assert math.isnan(stats["min_gap"][1, 0]) and stats["min_gap"][1, 1] == 2.0
    got = _floats(worst(stats))
    assert got["n"] == 2 and math.isnan(got["cond"])
    spectra = torch.tensor([[1.0, 2.0, 3.0], [1.0, math.inf, 3.0]], dtype=D)
    for per_sample in (eigen_stats(spectra), singular_stats(spectra.flip(-1))):  # an inf in the second spectrum
        assert per_sample["cond"][0] == 3.0 and math.isnan(per_sample["cond"][1]) and per_sample["n"][1] == 3


def test_complex_gap_stats_of_a_batch_of_batches():
    """Unordered eigenvalues (2, 2, 3), complex64: gaps |w_i - w_j| over each sample in float64, the tie of the
    sample (1, 1, 4i) with its magnitude, and no gap for a single eigenvalue."""
    from ris_stability.linalg.site_stats import complex_gap_stats
    w = torch.tensor([[[1, 3, 6], [1, 1, 4j]], [[2j, -2j, 0], [5, 5j, -5]]], dtype=torch.complex64)
    got = complex_gap_stats(w, torch.float32)
    assert all(v.dtype == D and v.shape == (2, 2) for v in got.values())
    assert got["min_gap"].flatten().tolist() == pytest.approx([2.0, 0.0, 2.0, 5 * math.sqrt(2)])
    assert got["max_cluster"].tolist() == [[1, 2], [1, 1]] and got["cluster_value"][0, 1] == 1.0
    assert math.isnan(got["cluster_value"][0, 0]) and got["amplification"][0, 0] == 0.5
    one = complex_gap_stats(torch.tensor([[2.0 + 0j]]), torch.float32)
    assert math.isnan(one["min_gap"][0]) and one["max_cluster"][0] == 1


def test_worst_segments_of_interleaved_groups_by_hand():
    """Rows of two sites interleaved (segments 0, 1, 0, 1, 0): per site, the smallest gap and largest Hermitian error
    over the rows that define them, the cluster value of the FIRST row with the largest cluster (two rows tie at
    size 2), NaN where no row defines a statistic; a broken row poisons its own site only, never n."""
    from ris_stability.numerics.stats import STAT_KEYS, worst_segments
    rows = _rows({"n": 3, "max_cluster": 2, "cluster_value": 4.0, "min_gap": NAN, "herm_err": 0.5, "rel_sep": NAN},
                 {"n": 5, "max_cluster": 1, "cluster_value": NAN, "min_gap": 3.0, "lambda_max": NAN},
                 {"n": 3, "max_cluster": 1, "cluster_value": NAN, "min_gap": 0.25, "herm_err": NAN, "rel_sep": NAN},
                 {"n": 5, "max_cluster": 3, "cluster_value": 7.0, "min_gap": 1.0},
                 {"n": 3, "max_cluster": 2, "cluster_value": 9.0, "min_gap": 2.0, "herm_err": 0.125, "rel_sep": NAN})
    table = worst_segments(rows, torch.tensor([0, 1, 0, 1, 0]), 2)
    first, second = (dict(zip(STAT_KEYS, row)) for row in table.tolist())
    _check(first, {"n": 3, "max_cluster": 2, "cluster_value": 4.0, "min_gap": 0.25, "herm_err": 0.5, "rel_sep": NAN,
                   "lambda_max": 1.0})
    assert second["n"] == 5 and all(math.isnan(v) for k, v in second.items() if k != "n")
    alone = worst_segments(rows[2:4], None, 2)  # one row per site: each row is its site's worst case
    assert alone[0].tolist() == pytest.approx(rows[2].tolist(), nan_ok=True)
    assert alone[1].tolist() == pytest.approx(rows[3].tolist(), nan_ok=True)
