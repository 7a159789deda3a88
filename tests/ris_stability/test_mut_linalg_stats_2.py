"""What the probe records per kind of op (linalg/site_stats.py, linalg/site_grads.py), read from its records on
matrices small enough to work out by hand: eig/eigvals hazards, the eigh/svd tables of a whole batch, the gap a
matrix norm depends on, pinv's cut-off, a kind registered with its own statistics, and what backward handed the
site (the gradient norm it passed back, the eig backward's two parts)."""
from __future__ import annotations

import math
import types

import pytest
import torch

from ris_stability.instruments.probe import SpectralProbe
from ris_stability.linalg import registry, site_stats
from ris_stability.linalg.site_grads import BackwardRecord
from ris_stability.linalg.op_spec import TIE, HazardWords, LinalgOp, Spelling
from ris_stability.numerics.stats import eig_backward_terms
from ris_stability.observe import intercept

D, C = torch.float64, torch.complex128
NAN = float("nan")


@pytest.fixture(autouse=True)
def fresh_tables():
    """The per-kind measurements (site_stats.KINDS) are derived from the registry on first read and cached;
    re-declaring a kind, unchanged, makes this test derive them again (so a fault in how a kind is measured
    shows in the test that reads it, not only in whichever test read the table first)."""
    registry.register_kind(registry.KINDS["eig"])
    yield


def _records(fn) -> dict:
    with SpectralProbe(roots={}) as probe:
        fn()
    return probe.collect()


def _check(stats: dict, want: dict) -> None:
    for key, value in want.items():
        assert stats[key] == pytest.approx(value, rel=1e-12, abs=1e-12, nan_ok=True), (key, stats[key], value)


# -- eig / eigvals: separation, non-normality, Hermitian error; no conditioning ---------------------------------------
UPPER = torch.tensor([[1.0, 1.0], [0.0, 3.0]], dtype=D)  # eigenvalues 1 and 3, not normal, not Hermitian
UPPER_EIG = {"n": 2, "lambda_min": 1, "lambda_max": 3, "min_gap": 2, "amplification": 0.5, "max_cluster": 1,
             "cluster_value": NAN, "herm_err": math.sqrt(2) / math.sqrt(11), "rel_sep": 2 / 3,
             "non_normal": math.sqrt(10) / 11, "rank": NAN, "cond": NAN, "trace": NAN, "gap_split": NAN,
             "cutoff_margin": NAN}


@pytest.mark.parametrize("op", ["eig", "eigvals"])
def test_eig_sites_report_separation_and_non_normality_by_hand(op):
    """eig's record: eigenvalue magnitudes, gaps, Hermitian error, separation and non-normality of the matrix, no
    condition number (eig inverts nothing); the same whether the eigenvalues come alone or with vectors."""
    rec = _records(lambda: getattr(torch.linalg, op)(UPPER))[f"linalg.{op}"]
    _check(rec["stats"], UPPER_EIG)


def test_eig_of_a_batch_reports_its_worst_matrix_and_a_tie_with_its_value():
    """A batch of two: the tied pair (2, 2) of the second matrix is the cluster reported, at |lambda| = 2, with
    zero separation; the extremes span both matrices."""
    tied = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0]], dtype=D)
    spread = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=D))
    batch = torch.stack([spread, tied])
    rec = _records(lambda: torch.linalg.eig(batch))["linalg.eig"]
    comm = torch.linalg.matrix_norm(tied @ tied.mT - tied.mT @ tied) / torch.linalg.matrix_norm(tied) ** 2
    _check(rec["stats"], {"n": 3, "lambda_min": 1, "lambda_max": 9, "min_gap": 0, "amplification": math.inf,
                          "max_cluster": 2, "cluster_value": 2, "rel_sep": 0, "non_normal": float(comm),
                          "herm_err": math.sqrt(2 / 34)})
    assert rec["calls"] == 1


# -- eigh / eigvalsh: the whole batch from the op's eigenvalues, the Hermitian error of a sample -------------------
def _symmetric_batch(odd_one: int) -> torch.Tensor:
    """(2, 3, 3, 3): diag(1, 2, 4) everywhere but one diag(1, 1, 8) in the last place; matrix ``odd_one`` (flat
    order) has a 1 above its diagonal that eigh never reads (it reads the lower triangle)."""
    batch = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=D)).repeat(6, 1, 1)
    batch[5] = torch.diag(torch.tensor([1.0, 1.0, 8.0], dtype=D))
    batch[odd_one, 0, 1] = 1.0
    return batch.reshape(2, 3, 3, 3)


@pytest.mark.parametrize("op", ["eigh", "eigvalsh"])
def test_eigh_sites_measure_every_matrix_and_the_hermitian_error_of_the_first_few(op):
    """Every matrix of the batch is measured from the eigenvalues the op returned (the tie of the last one is
    found), and the Hermitian error of the first HERM_SAMPLE: a matrix beyond them is not measured."""
    inside, beyond = site_stats.HERM_SAMPLE - 1, site_stats.HERM_SAMPLE
    for odd_one, herm_err in ((inside, math.sqrt(2 / 22)), (beyond, 0.0)):
        rec = _records(lambda: getattr(torch.linalg, op)(_symmetric_batch(odd_one)))[f"linalg.{op}"]
        _check(rec["stats"], {"n": 3, "rank": 3, "cond": 8, "log10_cond": math.log10(8), "lambda_min": 1,
                              "lambda_max": 8, "trace": 10, "min_gap": 0, "amplification": math.inf,
                              "max_cluster": 2, "cluster_value": 1, "herm_err": herm_err, "rel_sep": NAN})


# -- svd / svdvals: rank and condition on s, gaps and clusters on s^2 --------------------------------------------
@pytest.mark.parametrize("op", ["svd", "svdvals"])
def test_svd_sites_take_gaps_on_squares_and_report_a_cluster_in_units_of_s(op):
    """Four 3x2 matrices, three with s = (2, 0.5) and the last with (3, 3): the worst condition is 4, the tie is at
    s = 3 (not 9), the smallest gap is 0 and the gaps are on s^2 (4 - 0.25)."""
    spread = torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.0, 0.0]], dtype=D)
    a = torch.stack([spread, spread, spread, torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 0.0]], dtype=D)])
    rec = _records(lambda: getattr(torch.linalg, op)(a))[f"linalg.{op}"]
    _check(rec["stats"], {"n": 2, "rank": 2, "cond": 4, "lambda_min": 0.5, "lambda_max": 3, "trace": 6, "gap_split": NAN,
                          "min_gap": 0, "amplification": math.inf, "max_cluster": 2, "cluster_value": 3,
                          "herm_err": NAN})
    one = _records(lambda: getattr(torch.linalg, op)(a[:1]))[f"linalg.{op}"]
    _check(one["stats"], {"min_gap": 3.75, "amplification": 1 / 3.75, "max_cluster": 1, "cluster_value": NAN})


# -- matrix norms: the gap their order depends on ------------------------------------------------------------------
@pytest.mark.parametrize("order, split, signal, noise", [
    (2, 25 - 9, NAN, 9 - 1),     # the top singular value: its gap to the next
    (-2, 9 - 1, 25 - 9, NAN),    # the bottom one: its gap to the one above
    ("nuc", NAN, NAN, NAN),      # every singular value alike: no split
], ids=["spectral", "smallest", "nuclear"])
def test_a_matrix_norm_site_reports_the_gap_of_its_order(order, split, signal, noise):
    """A 4x3 matrix with s = (5, 3, 1): the 2-norm depends on the gap s1^2 - s2^2, the -2 norm on s2^2 - s3^2."""
    a = torch.zeros(4, 3, dtype=D)
    a[0, 0], a[1, 1], a[2, 2] = 5.0, 3.0, 1.0
    (rec,) = _records(lambda: torch.linalg.matrix_norm(a, ord=order)).values()
    _check(rec["stats"], {"n": 3, "rank": 3, "cond": 5, "min_gap": 8, "gap_split": split, "min_gap_signal": signal,
                          "min_gap_noise": noise})


# -- pinv: its cut-off margin, besides the singular-value statistics ----------------------------------------------
def test_pinv_site_reports_the_decades_to_its_cutoff():
    """s = (1, 1e-10) of a 3x2 matrix: pinv's default cut-off is 3 eps, 10^5.35 below the smaller one."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1e-10], [0.0, 0.0]], dtype=D)
    rec = _records(lambda: torch.linalg.pinv(a))["linalg.pinv"]
    cut = 3 * torch.finfo(D).eps
    _check(rec["stats"], {"n": 2, "rank": 2, "cond": 1e10, "lambda_min": 1e-10,
                          "cutoff_margin": math.log10(1e-10 / cut)})
    broken = torch.stack([a, torch.full_like(a, math.nan)])

    def fails():
        with pytest.raises(torch.linalg.LinAlgError):
            torch.linalg.pinv(broken)
    rec = _records(fails)["linalg.pinv"]  # the failed call is measured from its input: NaN, not a crash
    assert math.isnan(rec["stats"]["cutoff_margin"]) and math.isnan(rec["stats"]["cond"]) and rec["stats"]["n"] == 2


# -- the signal dimension reaches the tables of a whole batch -------------------------------------------------------
@pytest.mark.parametrize("k", [1, "per-sample"])
def test_the_signal_dimension_splits_eigh_and_svd_spectra(k):
    """diag(1, 2, 4): with the top eigenvalue as signal the split gap is 4 - 2 and the noise gap 2 - 1; for the
    singular values (4, 2, 1) the same split on the squares: 16 - 4 and 4 - 1. A per-sample k of the batch's shape
    gives the same."""
    a = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=D)).repeat(2, 1, 1)
    with SpectralProbe(roots={}) as probe:
        probe.set_signal_dim(1 if k == 1 else torch.ones(2, dtype=torch.long))
        torch.linalg.eigvalsh(a)
        torch.linalg.svdvals(a)
    recs = probe.collect()
    _check(recs["linalg.eigvalsh"]["stats"], {"gap_split": 2, "min_gap_noise": 1, "min_gap_signal": NAN})
    _check(recs["linalg.svdvals"]["stats"], {"gap_split": 12, "min_gap_noise": 3, "min_gap_signal": NAN})


# -- a kind of op registered with its own statistics ----------------------------------------------------------------
@pytest.fixture
def scratch_registry():
    """Registrations made by the test are undone afterwards."""
    saved = (dict(registry._OPS), dict(registry._BY_BASE), dict(registry._KINDS), dict(site_stats._CUSTOM))
    entry_points = list(intercept.ENTRY_POINTS)
    yield
    intercept.ENTRY_POINTS[:] = entry_points
    for table, old in zip((registry._OPS, registry._BY_BASE, registry._KINDS, site_stats._CUSTOM), saved):
        table.clear()
        table.update(old)
    registry._version += 1


def test_a_kind_with_its_own_statistics_is_measured_call_by_call_with_its_contract(scratch_registry):
    """A user's eigh registered as a kind of its own (vectors at output 1, Hermitian input): each call is measured
    alone by the user's function, the Hermitian error is added to what it returns, the keys it leaves out are NaN,
    and the eigenvector gradient is watched. A kind whose statistics nobody computes, declared before it, is
    skipped without hiding it."""
    seen = []

    def top_stats(flat, out, k):
        seen.append(tuple(flat.shape))
        return {"n": torch.full(flat.shape[:-2], float(flat.shape[-1]), dtype=D), "lambda_max": out[0][..., -1]}

    from ris_stability.linalg.op_spec import Kind
    registry.register_kind(Kind("unmeasured", "no_such_family"))
    site_stats.register_kind("top_eig", top_stats, vector_outputs=(1,), hermitian=True)
    lib = types.ModuleType("mylib")
    lib.top_eig = torch.linalg.eigh
    words = HazardWords("eigenvalues", "test op", "gap")
    registry.register(LinalgOp("top_eig", "top_eig", words, TIE, (Spelling(lib, "top_eig", "mylib.top_eig"),)))
    a = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=D))
    a[0, 1] = 1.0  # above the diagonal: eigh reads the lower triangle, the Hermitian error sees it
    a.requires_grad_()
    with SpectralProbe(roots={}) as probe:
        for _ in range(2):
            lib.top_eig(a[None])[1][..., -1].sum().backward()
    (rec,) = probe.collect().values()
    assert seen == [(1, 3, 3), (1, 3, 3)] and rec["calls"] == 2 and rec["vec_grad"] is True
    _check(rec["stats"], {"n": 3, "lambda_max": 4, "herm_err": math.sqrt(2 / 22), "rank": NAN, "min_gap": NAN})


# -- what backward handed the site ----------------------------------------------------------------------------------
def test_grad_norm_is_the_gradient_each_call_passed_back_in_units_of_its_matrix():
    """eigvalsh(A).sum() passes back dL/dA = I: each call contributes ||I|| ||A||, and the calls add in quadrature
    (a call weighted 2 counts 2x). A batch too large to keep (1025 matrices 2I of 8 x 8) is measured by its norm at
    once, same rule: ||I|| ||2I|| over the batch, 2 * 8200."""
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=D, requires_grad=True)
    big = (torch.eye(8, dtype=D) * 2).repeat(1025, 1, 1).requires_grad_()
    with SpectralProbe(roots={}) as probe:
        (torch.linalg.eigvalsh(a).sum() + 2 * torch.linalg.eigvalsh(a).sum()).backward()
    norm_a = float(torch.linalg.matrix_norm(a.detach()))
    assert probe.collect()["linalg.eigvalsh"]["grad_norm"] == pytest.approx(math.sqrt(10) * norm_a, rel=1e-12)
    with SpectralProbe(roots={}) as probe:
        torch.linalg.eigvalsh(big).sum().backward()
    assert probe.collect()["linalg.eigvalsh"]["grad_norm"] == pytest.approx(2 * 8200.0, rel=1e-12)
    with SpectralProbe(roots={}) as probe:
        torch.linalg.eigvalsh(a.detach())
    assert math.isnan(probe.collect()["linalg.eigvalsh"]["grad_norm"])  # nothing passed back: not measured


def _eig_loss(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eig(m)
    v.retain_grad()
    weights = torch.arange(1.0, m.shape[-1] ** 2 + 1, dtype=D).reshape(m.shape[-2:])
    loss = (v.abs() ** 2 * weights).sum() + w.real.sum()  # invariant to each eigenvector's phase
    loss.backward()
    return eig_backward_terms(w.detach(), v.detach(), v.grad)


def test_eig_sites_report_the_two_parts_of_the_eig_backward():
    """The phase noise and the gap terms the probe reports are those of the eig backward of each call (a batch of
    two or a single matrix), the largest over the calls."""
    small = torch.tensor([[1.0, 1.0], [0.0, 3.0]], dtype=D, requires_grad=True)
    near = torch.tensor([[[1.0, 2.0], [0.5, 1.2]], [[2.0, 0.0], [1.0, -1.0]]], dtype=D, requires_grad=True)
    with SpectralProbe(roots={}) as probe:
        parts = [_eig_loss(m) for m in (small * 3, near, small)]
    (rec,) = probe.collect().values()
    assert rec["calls"] == 3
    noise, terms = (max(float(p[i].amax()) for p in parts) for i in (0, 1))
    assert terms > 0 and rec["backward"]["gap_terms"] == pytest.approx(terms, rel=1e-12)
    assert rec["backward"]["phase_noise"] == pytest.approx(noise, rel=1e-12, abs=1e-300)
    per_call = [float(p[1].amax()) for p in parts]
    assert per_call.index(terms) != 0  # not only the first call counts
    with SpectralProbe(roots={}) as probe:
        torch.linalg.eig(small)[0].real.sum().backward()  # eigenvalues only: no eigenvector terms
    assert all(math.isnan(v) for v in probe.collect()["linalg.eig"]["backward"].values())


def test_a_backward_record_accumulates_until_it_is_reset():
    """What a site's hooks kept is measured at each settle and added to (gradient norm, in quadrature), or-ed
    with (eigenvector gradient received) or maxed with (eig terms) what earlier settles found."""
    rec = BackwardRecord()
    vec, back = rec.vector_hook(), rec.backward_hook(torch.full((2, 2), 2.0, dtype=D))  # ||matrix|| = 4
    assert vec(torch.ones(3)) is None and vec(None) is None
    back((torch.full((2, 2), 0.5, dtype=D),), None)  # ||g|| = 1: contributes 4
    rec.settle()
    assert bool(rec.vec) and float(rec.back) == pytest.approx(16.0)
    vec(torch.zeros(3))
    back((torch.full((2, 2), 1.5, dtype=D),), None)  # ||g|| = 3: contributes 12
    back((None,), None)
    rec.settle()
    assert bool(rec.vec) and float(rec.back) == pytest.approx(16.0 + 144.0)
    w, v = torch.tensor([1.0, 3.0], dtype=C), torch.eye(2, dtype=C)
    for g01, g11 in ((2.0, 0.3j), (1.0, 0.7j)):  # gap term |g01 / 2|, phase noise |Im g11|
        rec.eig_hook(w[None], v[None])(torch.tensor([[[0, g01], [0, g11]]], dtype=C))
        rec.eig_hook(w[None], v[None])(None)
        rec.settle()
    assert float(rec.eig_terms["gap_terms"]) == pytest.approx(1.0) and float(rec.eig_terms["phase_noise"]) == 0.7
    fresh = BackwardRecord()
    fresh.vector_hook()(torch.zeros(2))
    fresh.settle()
    assert not bool(fresh.vec) and fresh.back is None and fresh.eig_terms == {}


# -- calls of one site measured together keep their own precision and signal dimension -----------------------------
def test_calls_measured_together_keep_their_own_dtype_and_signal_dimension():
    """One call site in a loop: diag(1e-9, 1) in float64 is rank 2, in float32 rank 1 (below float32's tolerance);
    diag(1, 2, 4) split with k = 1 has gap 2, with k = 2 gap 1. The worst case over the loop is rank 1 and gap 1,
    as if each call had been measured alone."""
    small = torch.diag(torch.tensor([1e-9, 1.0], dtype=D))
    spread = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=D))
    with SpectralProbe(roots={}) as probe:
        for m, k in ((small, None), (small.float(), None), (spread, 1), (spread, 2), (spread, 1)):
            probe.set_signal_dim(k)
            torch.linalg.eigvalsh(m)
    recs = probe.collect()
    assert recs["linalg.eigvalsh"]["calls"] == 2 and recs["linalg.eigvalsh[3x3]"]["calls"] == 3
    _check(recs["linalg.eigvalsh"]["stats"], {"rank": 1, "cond": math.inf, "gap_split": NAN})
    _check(recs["linalg.eigvalsh[3x3]"]["stats"], {"gap_split": 1, "min_gap_signal": 2, "min_gap_noise": 1})


def test_a_broken_matrix_among_general_ops_is_reported_broken_not_singular():
    """inv of a batch holding a NaN matrix: that matrix's statistics are NaN (the site's worst case is then NaN, n
    kept), not those of a zero matrix (cond inf); a loop of cholesky calls is measured from its inputs."""
    good = torch.diag(torch.tensor([1.0, 4.0], dtype=D))
    rec = _records(lambda: torch.linalg.inv(torch.stack([good, torch.full_like(good, math.nan)])))["linalg.inv"]
    assert rec["stats"]["n"] == 2 and math.isnan(rec["stats"]["cond"]) and math.isnan(rec["stats"]["rank"])

    def loop():
        for scale in (1.0, 3.0):
            torch.linalg.cholesky(good * scale)
    rec = _records(loop)["linalg.cholesky"]
    _check(rec["stats"], {"n": 2, "rank": 2, "cond": 4, "lambda_min": 1, "lambda_max": 12, "herm_err": 0,
                          "min_gap": 3})
    assert rec["calls"] == 2


def test_every_kind_is_measured_on_the_device_of_its_call():
    """The statistics of each kind of call, the merging of calls and what backward handed a site are computed where
    the call ran (no host copy, no sync): on the meta device, which holds no data, a helper tensor made on the CPU
    would fail at once."""
    meta = torch.device("meta")
    flat = torch.empty(3, 4, 4, dtype=D, device=meta)
    values, w = torch.empty(3, 4, dtype=D, device=meta), torch.empty(3, 4, dtype=C, device=meta)
    outs = {"eig": (w, flat.to(C)), "eigvals": w, "eigh": (values, flat), "eigvalsh": values, "svd": (flat, values, flat),
            "svdvals": values, "general": None, "pinv": None, "herm": None, "norm_2": None, "norm_-2": None,
            "norm_nuc": None}
    for kind, out in outs.items():
        for k in (None, 1):
            assert site_stats.stat_rows(kind, flat, out, k).device == meta, kind
    parts = site_stats.batch_parts("eigh", (values, flat), 1, 3)
    merged = site_stats.batched_rows([("eigh", flat, parts, 1), ("eigh", flat, parts, 1), ("herm", flat, None, None),
                                      ("herm", flat, None, None)])
    assert [(m[0], m[1].shape[0]) for m in merged] == [("eigh", 6), ("herm", 6)] and merged[0][2][1] is None
    rec = BackwardRecord()
    rec.backward_hook(flat)((flat,), None)
    rec.vector_hook()(flat)
    rec.eig_hook(w, flat.to(C))(flat.to(C))
    rec.settle()
    assert rec.back.device == meta and rec.vec.device == meta and rec.eig_terms["gap_terms"].device == meta


def test_pinv_cutoff_of_a_wide_matrix_and_per_matrix_rows():
    """A wide 2x3 matrix: pinv's default cut-off is max(m, n) eps = 3 eps (not 2 eps); the signal dimension reaches
    its gaps. Per matrix (stat_rows, before any worst case), only the matrix with a NaN is NaN."""
    wide = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1e-10, 0.0]], dtype=D)
    with SpectralProbe(roots={}) as probe:
        probe.set_signal_dim(1)
        torch.linalg.pinv(wide)
    rec = probe.collect()["linalg.pinv"]
    _check(rec["stats"], {"cutoff_margin": math.log10(1e-10 / (3 * torch.finfo(D).eps)), "gap_split": 1 - 1e-20})
    rows = site_stats.stat_rows("pinv", torch.stack([wide, torch.full_like(wide, math.nan)]), None, None)
    margin, n = rows[:, site_stats.STAT_KEYS.index("cutoff_margin")], rows[:, site_stats.STAT_KEYS.index("n")]
    assert margin[0] == pytest.approx(math.log10(1e-10 / (3 * torch.finfo(D).eps))) and math.isnan(margin[1])
    assert n.tolist() == [2.0, 2.0]
