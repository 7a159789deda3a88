"""MUSIC: oracle on planted sources, conjugation-bug detection, K estimate, chunking/grouping invariance."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ris_model.music as music_mod
from ris_model.complex_ops import quad_form
from ris_model.config import MusicConfig, RunConfig, SceneConfig
from ris_model.music import (Estimates, MusicError, estimate_k, music, music_spectrum, null_spectrum,
                             signal_subspace)
from ris_model.simulate import make_system, simulate, true_covariance

CFG = RunConfig()
SYSTEM = make_system(CFG)
SCENE = CFG.scene
# The oracle must hold after refinement from a coarse grid (the default is 0.5 deg x 0.5 deg x 24 planes).
COARSE = MusicConfig(phi_step_deg=1.0, theta_step_deg=1.0, n_range=12)
FAST = MusicConfig(phi_step_deg=2.0, theta_step_deg=2.0, n_range=6)  # for tests that are not the oracle
ANGLE_TOL_DEG = 0.1
RANGE_TOL_REL = 0.02


def planted(sources: list[list[tuple[float, float, float]]]) -> dict[str, torch.Tensor]:
    """Scenes from (phi_deg, theta_deg, r_m) lists: truth (B, K_MAX) tensors and R_true."""
    b, k_max = len(sources), SCENE.k_max
    phi, theta = torch.zeros(b, k_max, dtype=torch.float64), torch.zeros(b, k_max, dtype=torch.float64)
    r, mask = torch.ones(b, k_max, dtype=torch.float64), torch.zeros(b, k_max, dtype=torch.bool)
    for i, scene in enumerate(sources):
        for j, (p, t, rr) in enumerate(scene):
            phi[i, j], theta[i, j], r[i, j], mask[i, j] = math.radians(p), math.radians(t), rr, True
    a = SYSTEM.steer(phi, theta, r)
    R = true_covariance(a, torch.ones(b, k_max, dtype=torch.float64), mask)
    return {"phi": phi, "theta": theta, "r": r, "mask": mask, "k": mask.sum(-1), "R": R}


def max_errors(est: Estimates, truth: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Worst angle error (deg) and relative range error over all true sources, nearest estimate each."""
    worst_ang, worst_rng = 0.0, 0.0
    for b in range(est.phi.shape[0]):
        e = est.mask[b]
        for j in truth["mask"][b].nonzero().reshape(-1).tolist():
            dp = torch.rad2deg(est.phi[b, e] - truth["phi"][b, j]).abs()
            dt = torch.rad2deg(est.theta[b, e] - truth["theta"][b, j]).abs()
            i = int((dp + dt).argmin())
            worst_ang = max(worst_ang, float(dp[i]), float(dt[i]))
            worst_rng = max(worst_rng, float((est.r[b, e][i] - truth["r"][b, j]).abs() / truth["r"][b, j]))
    return worst_ang, worst_rng


SINGLES = [(55, 25, 0.6), (-55, -25, 9.0), (55, -25, 9.0), (-55, 25, 0.6), (0, 0, 0.6), (0, 0, 9.0),
           (23.3, -11.7, 2.3), (-37.9, 14.2, 4.7), (12.25, 27.75, 0.75), (-58.0, -3.3, 6.1)]
TRIPLES = [[(-40, -10, 0.8), (5, 15, 3.0), (45, -5, 7.5)],
           [(-20, 20, 9.0), (30, 0, 0.6), (50, -25, 2.0)],
           [(-55, -25, 1.5), (0, 0, 5.0), (55, 25, 0.7)]]


@pytest.fixture(scope="module")
def oracle() -> tuple[Estimates, dict[str, torch.Tensor]]:
    truth = planted([[s] for s in SINGLES] + TRIPLES)
    return music(truth["R"], truth["k"], SYSTEM, SCENE, COARSE), truth


def test_oracle_single_sources_across_the_field_of_view(oracle):
    est, truth = oracle
    n = len(SINGLES)
    sub = Estimates(*(getattr(est, f)[:n] for f in ("phi", "theta", "r", "mask", "k")))
    ang, rng = max_errors(sub, {k: v[:n] for k, v in truth.items()})
    assert ang < ANGLE_TOL_DEG and rng < RANGE_TOL_REL
    assert sub.k.tolist() == [1] * n


def test_oracle_three_well_separated_sources(oracle):
    est, truth = oracle
    n = len(SINGLES)
    sub = Estimates(*(getattr(est, f)[n:] for f in ("phi", "theta", "r", "mask", "k")))
    ang, rng = max_errors(sub, {k: v[n:] for k, v in truth.items()})
    assert sub.k.tolist() == [3] * len(TRIPLES)
    assert ang < ANGLE_TOL_DEG and rng < RANGE_TOL_REL


def test_oracle_with_estimated_k_on_simulated_scenes():
    d = simulate(CFG, SYSTEM, "test", list(range(4)))
    est = music(d["R_true"], None, SYSTEM, SCENE, FAST)
    assert est.k.tolist() == d["k"].tolist()
    assert bool(torch.isfinite(est.phi).all() and (est.r > 0).all())


def test_spectrum_is_the_hermitian_quadratic_form():
    """P = 1 / (1 - a^H (E E^H) a): real, and equal to the conjugate-transpose quadratic form; the
    bilinear a^T X a (the classic silent bug) is not even real."""
    truth = planted([[(20, -10, 1.5), (-30, 5, 4.0)]])
    _, es = signal_subspace(truth["R"], 2)
    phi = torch.deg2rad(torch.linspace(-50, 50, 7, dtype=torch.float64))
    theta = torch.deg2rad(torch.linspace(-20, 20, 7, dtype=torch.float64))
    r = torch.linspace(0.7, 8.0, 7, dtype=torch.float64)
    p = music_spectrum(es, SYSTEM, phi, theta, r)[0]
    a = SYSTEM.steer(phi, theta, r)
    proj = es[0] @ es[0].mH
    q = quad_form(a, proj)
    assert float(q.imag.abs().max()) < 1e-14
    assert torch.allclose(p, 1 / (1 - q.real), rtol=1e-10)
    assert float(torch.einsum("gi,ij,gj->g", a, proj, a).imag.abs().max()) > 0.01


def test_conjugation_bug_is_caught_by_the_oracle():
    """The same estimator on conj(R) (equivalent to E_s^T a, or conj steering) misses the sources."""
    truth = planted([[(35, 15, 2.0)], [(-25, -20, 6.0)]])
    good = music(truth["R"], truth["k"], SYSTEM, SCENE, FAST)
    bad = music(truth["R"].conj(), truth["k"], SYSTEM, SCENE, FAST)
    assert max_errors(good, truth)[0] < ANGLE_TOL_DEG
    assert max_errors(bad, truth)[0] > 5.0
    # the peak moved to (about) the mirrored direction, the far-field signature of conj(a)
    assert torch.allclose(torch.rad2deg(bad.phi[:, 0]), -torch.rad2deg(truth["phi"][:, 0]), atol=3.0)


def test_spectrum_peaks_at_the_source_and_is_at_least_one():
    truth = planted([[(10, 5, 1.0)]])
    _, es = signal_subspace(truth["R"], 1)
    phi = torch.deg2rad(torch.tensor([10.0, 12.0, 10.0, -10.0], dtype=torch.float64))
    theta = torch.deg2rad(torch.tensor([5.0, 5.0, 5.0, -5.0], dtype=torch.float64))
    r = torch.tensor([1.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    p = music_spectrum(es, SYSTEM, phi, theta, r)[0]
    assert float(p[0]) > 1e6 and bool((p[1:] < p[0] / 100).all()) and bool((p >= 1).all())


def test_chunking_and_grouping_do_not_change_results(monkeypatch):
    d = simulate(CFG, SYSTEM, "test", list(range(3)))
    _, es = signal_subspace(d["R_samp"], SCENE.k_max)
    es = es * (torch.arange(SCENE.k_max) < d["k"][:, None])[:, None, :]
    pts = [torch.rand(3000, dtype=torch.float32) * 0.5 for _ in range(2)] + [torch.rand(3000) * 5 + 0.5]
    ref = null_spectrum(es, SYSTEM, *pts)
    ref_est = music(d["R_samp"], d["k"], SYSTEM, SCENE, FAST)
    monkeypatch.setattr(music_mod, "CHUNK_BYTES", 1024 * 8 * 160)  # 1024-point chunks, 3 of them
    assert torch.equal(null_spectrum(es, SYSTEM, *pts), ref)
    monkeypatch.setattr(music_mod, "GROUP", 2)
    est = music(d["R_samp"], d["k"], SYSTEM, SCENE, FAST)
    for f in ("phi", "theta", "r", "mask"):
        assert torch.allclose(getattr(est, f).double(), getattr(ref_est, f).double(), atol=1e-9)


def test_k_zero_gives_no_estimate_and_bad_k_is_rejected():
    truth = planted([[(0, 0, 2.0)], [(10, 0, 2.0)]])
    est = music(truth["R"], torch.tensor([0, 1]), SYSTEM, SCENE, FAST)
    assert est.k.tolist() == [0, 1] and not bool(est.mask[0].any())
    with pytest.raises(MusicError, match="k must be"):
        music(truth["R"], torch.tensor([1, 6]), SYSTEM, SCENE, FAST)
    with pytest.raises(MusicError, match="non-finite"):
        music(truth["R"] * float("nan"), truth["k"], SYSTEM, SCENE, FAST)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_estimate_k_is_exact_on_r_true(k):
    srcs = [(-50 + 25 * i, (-1) ** i * 10.0, 0.7 + 2 * i) for i in range(k)]
    truth = planted([srcs])
    evals, _ = signal_subspace(truth["R"], SCENE.k_max)
    assert int(estimate_k(evals, SCENE.k_max)) == k
    assert int(estimate_k(evals.to(torch.float32), SCENE.k_max)) == k


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 5), gap=st.floats(20.0, 1e6), seed=st.integers(0, 2**16))
def test_estimate_k_picks_the_dominant_gap(k, gap, seed):
    g = torch.Generator().manual_seed(seed)
    # eigenvalue ratios below 2 everywhere except a drop of `gap` after the k-th eigenvalue
    steps = 1 + torch.rand(143, generator=g, dtype=torch.float64)
    steps[k - 1] = gap
    desc = torch.cat([torch.ones(1, dtype=torch.float64), 1 / torch.cumprod(steps, 0)])
    assert int(estimate_k(desc.flip(0)[None], 5)) == k


def test_estimate_k_with_too_few_snapshots_is_capped_at_the_rank():
    """Documented limit: rank(R) = L <= k_max makes lambda_{L+1} = 0 and the rule returns L."""
    desc = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * 140, dtype=torch.float64)
    assert int(estimate_k(desc.flip(0)[None], 5)) == 4
    with pytest.raises(MusicError, match="k_max"):
        estimate_k(desc.flip(0)[None], 144)


def test_refinement_recovers_a_near_field_source_between_grid_planes():
    """Range planes 0.5..10 m in 3 steps: a 0.9 m source lies far from any plane, and is still found."""
    truth = planted([[(15, -5, 0.9), (-30, 10, 8.0)]])
    est = music(truth["R"], truth["k"], SYSTEM, SCENE, MusicConfig(phi_step_deg=2.0, theta_step_deg=2.0, n_range=4))
    ang, rng = max_errors(est, truth)
    assert ang < ANGLE_TOL_DEG and rng < RANGE_TOL_REL


def test_music_scene_config_bounds_the_search():
    scene = SceneConfig(phi_deg=(0.0, 30.0), theta_deg=(-10.0, 10.0), range_m=(1.0, 3.0))
    truth = planted([[(20, 3, 2.0)]])
    est = music(truth["R"], truth["k"], SYSTEM, scene, COARSE)
    ang, rng = max_errors(est, truth)
    assert ang < ANGLE_TOL_DEG and rng < RANGE_TOL_REL


def test_grid_alone_misses_the_oracle_tolerance():
    """Without refinement the coarse grid is off by degrees near the array (the angle-range ridge is
    tilted), so the oracle tests above really exercise the refinement."""
    truth = planted([[s] for s in SINGLES[:4]])
    est = music(truth["R"], truth["k"], SYSTEM, SCENE,
                MusicConfig(phi_step_deg=1.0, theta_step_deg=1.0, n_range=12, refine_iters=0))
    ang, rng = max_errors(est, truth)
    assert ang > 1.0 and rng > RANGE_TOL_REL


def test_music_eval_rows_and_table():
    from ris_model.music_eval import EvalError, format_speed, run_music_eval
    from ris_model.scoring import format_rows

    cfg = dataclasses.replace(CFG, music=FAST)
    rows, speed = run_music_eval(cfg, 3, [5.0, 25.0])
    assert [r["method"] for r in rows if r["snr_bin"] == "all"] == ["MUSIC R_true, true K (oracle)",
                                                                    "MUSIC R_samp, true K"]
    oracle = [r for r in rows if r["method"].endswith("(oracle)")]
    assert all(r["matched_frac"] == 1.0 and r["rmse_phi"] < ANGLE_TOL_DEG and r["crb_phi"] is None for r in oracle)
    samp = [r for r in rows if r["method"] == "MUSIC R_samp, true K" and r["snr_bin"] != "all"]
    assert len(samp) >= 3
    assert all(r["crb_phi"] > 0 if r["n_matched"] else math.isnan(r["crb_phi"]) for r in samp)
    assert sum(r["n_sources"] for r in samp) == rows[-1]["n_sources"] == 2 * int(simulate(CFG, SYSTEM, "test", [0, 1, 2])["k"].sum())
    assert speed["scenes_in_call"] == 9  # R_true once + R_samp per SNR, in one MUSIC call
    assert speed["throughput"] > 0 and speed["throughput_flop_bound"] > 0
    assert 0 < speed["energy_frac R_samp 25 dB"] < speed["energy_frac R_true 25 dB"] == pytest.approx(1.0)
    text = format_rows(rows) + "\n" + format_speed(speed)
    assert "matched" in text and "crb r" in text and "FLOP bound" in text
    with pytest.raises(EvalError, match="valid: true, samp"):
        run_music_eval(cfg, 3, [5.0], sources=("pred",))


def test_oracle_resolves_two_sources_two_degrees_apart_at_0_6_m():
    """With the default grid (0.5 deg, 24 range planes) and suppression radius (music.nms_deg, 1 degree, below
    the separation) both sources come out, each within the oracle tolerance; a 3 degree radius merges each
    pair into one estimate and a spurious one. (On the 1 degree COARSE grid the two peaks of the horizontal
    pair are only two cells apart and share one 3x3x3 local maximum: the grid must resolve them too.)"""
    truth = planted([[(10.0, 5.0, 0.6), (12.0, 5.0, 0.6)], [(-20.0, 0.0, 0.6), (-20.0, 2.0, 0.6)]])
    est = music(truth["R"], truth["k"], SYSTEM, SCENE, MusicConfig())
    ang, rng = max_errors(est, truth)
    assert est.k.tolist() == [2, 2] and ang < ANGLE_TOL_DEG and rng < RANGE_TOL_REL
    wide = music(truth["R"], truth["k"], SYSTEM, SCENE, dataclasses.replace(MusicConfig(), nms_deg=3.0))
    assert max_errors(wide, truth)[0] > 1.0


def test_music_accepts_a_covariance_that_requires_grad_and_complex64():
    truth = planted([[(-12, 8, 1.2)]])
    R = truth["R"].to(torch.complex64).requires_grad_(True)
    est = music(R, None, SYSTEM, SCENE, FAST)
    ang, rng = max_errors(est, truth)
    assert int(est.k[0]) == 1 and ang < 0.01 and rng < 1e-3  # complex64 R limits the subspace accuracy
    assert est.phi.dtype == torch.float64 and not est.phi.requires_grad
