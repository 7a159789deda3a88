"""The fast refinement of the learned pipeline (``detector_refine``) against the generic ML code it replaces,
and the pipeline steps built on it (drop statistics, residual candidate, at most K_MAX sources)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ris_model.config import RunConfig
from ris_model.detector_refine import FastRefiner
from ris_model.ml_estimator import (_box, _columns_and_derivatives, energy, levenberg_marquardt, operators,
                                    residual_and_jacobian)
from ris_model.simulate import make_system, simulate

X = torch.tensor([[[0.3, 0.1, 0.2], [-0.2, 0.05, 1.0], [0.6, -0.3, -0.5]],
                  [[-0.9, 0.4, 1.9], [0.1, -0.45, -0.3], [0.0, 0.0, 0.0]]], dtype=torch.float64)


def _setup(fresnel: bool = False, snr: float = 30.0):
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, scene=dataclasses.replace(cfg.scene, snr_db=(snr, snr)),
                              geometry=dataclasses.replace(cfg.geometry, fresnel=fresnel))
    system = make_system(cfg)
    phis = operators(system.channel[None], system.codes[None])
    return cfg, system, phis, FastRefiner(system, phis, *_box(cfg.scene))


@pytest.fixture(scope="module")
def setup():
    cfg, system, phis, fr = _setup()
    return cfg, system, phis, fr, simulate(cfg, system, "test", list(range(4)))


@pytest.mark.parametrize("fresnel", [False, True])
def test_closed_form_derivatives_match_forward_mode_autograd(fresnel):
    _, system, phis, fr = _setup(fresnel)
    b_ref, db_ref = _columns_and_derivatives(X, phis, system)
    b, d = fr.columns(X)
    # the columns come from a complex64 GEMM (the phases before it are float64): single-precision agreement
    tol = dict(rtol=1e-5, atol=1e-6 * float(b_ref.abs().max()))
    torch.testing.assert_close(b, b_ref, **tol)
    torch.testing.assert_close(fr.plain_columns(X), b, rtol=0.0, atol=0.0)
    torch.testing.assert_close(d, db_ref.reshape(d.shape), rtol=1e-5, atol=1e-6 * float(db_ref.abs().max()))
    torch.testing.assert_close(fr.steering_and_derivatives(X)[:, :, 0], system.steer(X[..., 0], X[..., 1], X[..., 2].exp()),
                               rtol=1e-12, atol=1e-14)  # the steering vector itself stays float64


def test_normal_equations_match_the_golub_pereyra_jacobian(setup):
    _, system, phis, fr, d = setup
    y = d["y"][:2].to(torch.complex128)
    r, jac = residual_and_jacobian(X, phis, y, system)
    j = torch.view_as_real(jac.reshape(2, -1, 9)).transpose(-1, -2).reshape(2, -1, 9)
    rv = torch.view_as_real(r.reshape(2, -1)).reshape(2, -1)
    _, db_ref = _columns_and_derivatives(X, phis, system)
    b, _ = _columns_and_derivatives(X, phis, system)
    r2, s, chol = fr.project(b, y)
    # the exact derivative columns: the reduced normal equations themselves, to double precision
    jtj, g = fr.normal_equations(b, db_ref.reshape(*b.shape[:3], -1), r2, s, chol)
    torch.testing.assert_close(jtj, j.transpose(-1, -2) @ j, rtol=1e-9, atol=1e-9 * float(jtj.abs().max()))
    torch.testing.assert_close(g, (j.transpose(-1, -2) @ rv[..., None])[..., 0], rtol=1e-9,
                               atol=1e-9 * float(g.abs().max()))
    torch.testing.assert_close(fr.energy(X, y), energy(X, phis, y, system), rtol=1e-6, atol=0.0)
    jtj32, g32 = fr.normal_equations(b, fr.columns(X)[1], r2, s, chol)  # the pipeline's complex64 derivatives
    torch.testing.assert_close(jtj32, jtj, rtol=1e-4, atol=1e-5 * float(jtj.abs().max()))


def test_refine_follows_the_generic_levenberg_marquardt(setup):
    cfg, system, phis, fr, d = setup
    y = d["y"][:2].to(torch.complex128)
    x0 = X + 0.02
    ref = levenberg_marquardt(x0.clone(), phis, y, system, *_box(cfg.scene), 4)
    got = fr.refine(x0.clone(), y, 4)
    torch.testing.assert_close(got, ref, rtol=0.0, atol=1e-6)  # complex64 Jacobian: steps agree to ~1e-7
    assert not torch.equal(got, x0)


def test_removal_rise_equals_the_energies_without_each_source(setup):
    _, system, phis, fr, d = setup
    y = d["y"][:2].to(torch.complex128)
    e, rise = fr.removal_rise(X, y)
    ref = torch.stack([energy(X[:, [i for i in range(3) if i != j]], phis, y, system) for j in range(3)], -1)
    torch.testing.assert_close(e, energy(X, phis, y, system), rtol=1e-6, atol=0.0)  # complex64 columns
    torch.testing.assert_close(rise, ref - e[:, None], rtol=1e-5, atol=1e-7 * float(ref.max()))
    torch.testing.assert_close(fr.energy(X, y), e, rtol=1e-12, atol=0.0)


def test_a_batch_of_scenes_with_different_k_matches_one_call_per_scene(setup):
    """Slots past k[b] (padding, any values) leave every result as the call on the scene's first k[b] sources."""
    _, _, _, fr, d = setup
    y = d["y"][:2].to(torch.complex128)
    x = X + 0.02
    x[1, 2] = torch.tensor([5.0, -7.0, 3.0], dtype=torch.float64)  # padding: not a source of scene 1
    k = torch.tensor([3, 2])
    e, rise = fr.removal_rise(x, y, k)
    res = fr.residual(x, y, k)
    xr = fr.refine(x.clone(), y, 3, k)
    assert torch.isinf(rise[1, 2]) and torch.equal(xr[1, 2], x[1, 2].clamp(fr.lo, fr.hi))
    for b in range(2):
        xs, ys = x[b:b + 1, :int(k[b])], y[b:b + 1]
        e1, rise1 = fr.removal_rise(xs, ys)
        # complex64 columns from GEMMs of other shapes: agreement to their rounding (~1e-7 relative)
        torch.testing.assert_close(e[b:b + 1], e1, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(rise[b:b + 1, :int(k[b])], rise1, rtol=1e-5, atol=1e-7 * float(rise1.max()))
        torch.testing.assert_close(res[b:b + 1], fr.residual(xs, ys), rtol=0.0, atol=1e-6 * float(ys.abs().max()))
        torch.testing.assert_close(fr.energy(x, y, k)[b:b + 1], e1, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(xr[b:b + 1, :int(k[b])], fr.refine(xs.clone(), ys, 3), rtol=0.0, atol=1e-6)


class _Bare:
    """The pipeline methods of ``LearnedDetector`` without a network (only the map, refiner and params)."""

    def __init__(self, cfg, system, second=None, tau=40.0):
        from ris_model.beam_map import BeamMap
        from ris_model.detector_infer import LearnedDetector, PipelineParams

        self.cls = LearnedDetector
        self.cfg, self.system, self.lm_iters = cfg, system, 2
        self.params = PipelineParams(0.2, second, tau, 1)
        self.bmap = BeamMap(system, cfg.scene, 3.0, 8)
        self.refiner = FastRefiner(system, self.bmap.phis, *_box(cfg.scene))
        self.refiner_w = FastRefiner(system, self.bmap.w @ self.bmap.phis, *_box(cfg.scene))

    def __getattr__(self, name):
        return getattr(self.cls, name).__get__(self)


def _truth(d, i):
    k = int(d["k"][i])
    return torch.stack([d["phi"][i, :k], d["theta"][i, :k], d["r"][i, :k].log()], -1)


def test_residual_map_candidate_finds_the_source_left_out_and_extend_adds_it(setup):
    cfg, system, _, _, d = setup
    det = _Bare(cfg, system)
    i = int(torch.nonzero(d["k"] >= 2)[0])
    t = _truth(d, i)
    x = torch.zeros(1, cfg.scene.k_max + 1, 3, dtype=torch.float64)
    x[0, :len(t) - 1] = t[:-1]
    k = torch.tensor([len(t) - 1])
    found = det.residual_peaks(x, k, d["y"][i:i + 1])
    cand = found[0][0]
    assert abs(float(torch.rad2deg(cand[0] - t[-1, 0]))) <= 2.0 and abs(float(torch.rad2deg(cand[1] - t[-1, 1]))) <= 2.0
    xe, ke, gained = det.extend(x, k, d["y"][i:i + 1], found, float("-inf"), 40.0)
    assert int(ke[0]) == len(t) and gained.tolist() == [0]
    assert float(torch.rad2deg(xe[0, len(t) - 1, :2] - t[-1, :2]).abs().max()) < 0.5


def test_prune_drops_a_duplicate_and_caps_at_k_max(setup):
    cfg, system, _, _, d = setup
    det = _Bare(cfg, system)
    i = int(torch.nonzero(d["k"] >= 2)[0])
    t = _truth(d, i)
    junk = torch.tensor([[0.9, -0.4, 0.5]], dtype=torch.float64)
    x = torch.cat([t, junk, torch.zeros(cfg.scene.k_max + 1 - len(t) - 1, 3, dtype=torch.float64)])[None]
    xp, kp = det.prune(x, torch.tensor([len(t) + 1]), d["y"][i:i + 1], 40.0)
    assert int(kp[0]) == len(t)  # the source at no source explains noise only: dropped
    full = torch.cat([t, junk.expand(cfg.scene.k_max + 1 - len(t), 3) + 0.1 * torch.arange(
        cfg.scene.k_max + 1 - len(t), dtype=torch.float64)[:, None]])[None]
    xc, kc = det.prune(full, torch.tensor([cfg.scene.k_max + 1]), d["y"][i:i + 1], float("-inf"),
                       k_keep=cfg.scene.k_max)
    assert int(kc[0]) == cfg.scene.k_max  # capped even when every source passes the threshold


@pytest.mark.parametrize("steps", [1, 2])
def test_detect_subtract_adds_one_missing_source_per_step(setup, steps):
    """Two sources left out: each detect-subtract step adds one (a step runs only on the scenes the previous
    one extended; the others would find the same rejected candidate again)."""
    cfg, system, _, _, d = setup
    det = _Bare(cfg, system)
    det.params = dataclasses.replace(det.params, detect_steps=steps)
    i = int(torch.nonzero(d["k"] >= 3)[0])
    t = _truth(d, i)
    x = torch.zeros(1, cfg.scene.k_max + 1, 3, dtype=torch.float64)
    x[0, :len(t) - 2] = t[:-2]
    xd, kd = det.detect_subtract(x, torch.tensor([len(t) - 2]), d["y"][i:i + 1], None, 40.0)
    assert xd.shape == (1, cfg.scene.k_max, 3)
    assert int(kd[0]) == len(t) - 2 + steps
    for added in xd[0, len(t) - 2:int(kd[0]), :2]:  # each added source lies on one of the two left out (3 deg grid)
        assert float(torch.rad2deg(t[-2:, :2] - added).abs().amax(-1).min()) < 1.5


def test_weakest_source_re_search_moves_a_misplaced_source_back():
    """A source left 15 deg off its true position (a false minimum of the short refinement: a miss and a false
    alarm at once) is moved back by the pipeline's re-search of the weakest source (``relocate_weakest``, on by
    default in ``PipelineParams``, gated by its drop statistic: a 10 dB scene); without it the refinement
    leaves it where it was."""
    cfg, system, _, _ = _setup(snr=10.0)
    d = simulate(cfg, system, "test", list(range(4)))
    det = _Bare(cfg, system, tau=None)
    i = int(torch.nonzero(d["k"] >= 2)[0])
    t = _truth(d, i)
    x0 = torch.zeros(1, cfg.scene.k_max, 3, dtype=torch.float64)
    x0[0, :len(t)] = t
    x0[0, len(t) - 1, 0] += math.radians(15.0)
    k0 = torch.tensor([len(t)])
    assert det.params.relocate is not None  # the step is part of the default pipeline
    x, _, _ = det.refined_peaks(x0, k0, d["y"][i:i + 1])
    assert float(torch.rad2deg(x[0, len(t) - 1, :2] - t[-1, :2]).abs().max()) < 1.0
    det.params = dataclasses.replace(det.params, relocate=None)
    x_off, _, _ = det.refined_peaks(x0, k0, d["y"][i:i + 1])
    assert float(torch.rad2deg(x_off[0, len(t) - 1, :2] - t[-1, :2]).abs().max()) > 5.0


def test_prune_of_a_batch_matches_prune_of_each_scene(setup):
    """Scenes with different k pruned together (rounds until no scene drops) end as each pruned alone."""
    cfg, system, _, _, d = setup
    det = _Bare(cfg, system)
    idx = torch.nonzero(d["k"] >= 2)[:2, 0].tolist()
    slots = cfg.scene.k_max + 1
    xs, ks = [], []
    for n, i in enumerate(idx):
        t = _truth(d, i)
        junk = torch.tensor([[0.9, -0.4, 0.5]], dtype=torch.float64)[:1 - n]  # the second scene: no junk
        x = torch.cat([t, junk])
        xs.append(torch.cat([x, torch.zeros(slots - len(x), 3, dtype=torch.float64)]))
        ks.append(len(x))
    x, k, y = torch.stack(xs), torch.tensor(ks), d["y"][idx]
    xp, kp = det.prune(x, k, y, 40.0)
    for b in range(len(idx)):
        xb, kb = det.prune(x[b:b + 1], k[b:b + 1], y[b:b + 1], 40.0)
        assert int(kp[b]) == int(kb[0]) == int(d["k"][idx[b]])
        torch.testing.assert_close(xp[b, :int(kb[0])], xb[0, :int(kb[0])], rtol=0.0, atol=0.0)


def _junk_batch(cfg, d, idx, junk_in):
    """Scenes idx with their true sources (slightly off) and, where junk_in, one source at no source."""
    slots = cfg.scene.k_max
    xs, ks = [], []
    for i, junk in zip(idx, junk_in):
        x = _truth(d, i) + 0.002
        if junk:
            x = torch.cat([x, torch.tensor([[0.9, -0.4, 0.5]], dtype=torch.float64)])
        xs.append(torch.cat([x, torch.zeros(slots - len(x), 3, dtype=torch.float64)]))
        ks.append(len(x))
    return torch.stack(xs), torch.tensor(ks), d["y"][idx]


@pytest.fixture(scope="module")
def twelve(setup):
    cfg, system = setup[:2]
    return simulate(cfg, system, "test", list(range(12)))


def _few(d, n):
    """Indices of n scenes with 2 <= K <= 4 (room for one more source)."""
    return torch.nonzero((d["k"] >= 2) & (d["k"] <= 4))[:n, 0].tolist()


def test_prune_statistics_are_those_of_the_sources_each_scene_keeps(setup, twelve):
    cfg, system, _, _, _ = setup
    d = twelve
    det = _Bare(cfg, system)
    idx = _few(d, 3)
    x, k, y = _junk_batch(cfg, d, idx, [True, False, True])
    x[2, 1] = x[2, 0]  # scene 2: its first source twice, pruned down to one
    k1 = torch.tensor([k[0], k[1], 2])
    xp, kp, (low, j, e, r) = det.prune_with_statistics(x, k1, y, 40.0)
    assert torch.equal(det.prune(x, k1, y, 40.0)[1], kp) and int(kp[2]) == 1
    for b in range(3):
        if int(kp[b]) < 2:
            assert torch.isinf(low[b])
            continue
        lb, jb, eb, rb = det.drop_statistics(xp[b:b + 1, :int(kp[b])], kp[b:b + 1], y[b:b + 1])
        # complex64 columns from GEMMs of other shapes: agreement to their rounding (~1e-7 relative)
        torch.testing.assert_close(low[b:b + 1], lb, rtol=1e-5, atol=0.0)
        torch.testing.assert_close(e[b:b + 1], eb, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(r[b:b + 1], rb, rtol=0.0, atol=1e-6 * float(y[b].abs().max()))
        torch.testing.assert_close(r[b:b + 1], det.refiner.residual(xp[b:b + 1, :int(kp[b])], y[b:b + 1]), rtol=0.0,
                                   atol=1e-6 * float(y[b].abs().max()))
        assert int(j[b]) == int(jb[0])


def test_re_search_on_the_statistics_of_pruning_equals_the_one_computing_them():
    cfg, system, _, _ = _setup(snr=10.0)
    d = simulate(cfg, system, "test", list(range(12)))
    det = _Bare(cfg, system)
    idx = _few(d, 3)
    x, k, y = _junk_batch(cfg, d, idx, [False, True, False])
    x[0, int(k[0]) - 1, 0] += math.radians(15.0)  # a misplaced source: the weakest after refinement, moved back
    xp, kp, stats = det.prune_with_statistics(det.refine(x, k, y), k, y, 40.0)
    x_own, moved_own = det.relocate_weakest(xp, kp, y, float("inf"))
    x_st, moved_st = det.relocate_weakest(xp, kp, y, float("inf"), stats)
    assert 0 in moved_st.tolist() and torch.equal(moved_st, moved_own)
    torch.testing.assert_close(x_st, x_own, rtol=0.0, atol=1e-9)
    det.params = dataclasses.replace(det.params, relocate=float("inf"))
    _, _, marks = det.refined_peaks(x, k, y)  # a moved scene is no longer as pruning tested it
    assert marks.pruned.tolist() == marks.known.tolist() == [b not in moved_st.tolist() for b in range(len(idx))]


def test_detect_subtract_leaves_scenes_pruning_tested_out_of_its_pruning(setup, twelve):
    """A scene marked as tested by pruning and not extended is not pruned again (here scene 0 holds a source at no
    source, which pruning would drop: the mark is the caller's word); unmarked (scene 1), or extended (scene 2:
    marked, one true source missing, found by the step), it is pruned. On the pipeline's own marks the result
    is that of pruning every scene."""
    cfg, system, _, _, _ = setup
    d = twelve
    det = _Bare(cfg, system)
    idx = _few(d, 3)
    x, k, y = _junk_batch(cfg, d, idx, [True, True, True])
    n2 = int(d["k"][idx[2]])
    x[2, n2 - 1], x[2, n2] = x[2, n2].clone(), 0.0  # scene 2: its last true source replaced by the junk one
    k[2] -= 1
    x = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
    tested = []
    det.prune_with_statistics = lambda xp, *a, **kw: tested.append(len(xp)) or _Bare.__getattr__(
        det, "prune_with_statistics")(xp, *a, **kw)
    from ris_model.detector_infer import Tested
    res = det.refiner.residual(x[:, :int(k.max())], y.to(torch.complex128), k)
    marks = Tested(torch.tensor([True, False, True]), torch.tensor([True, False, True]), res)
    stale = []  # every residual a step takes as known is that of the scene's current sources

    def spy(xs, ks, ys, known):
        ref = det.refiner.residual(xs[:, :int(ks.max())], ys.to(torch.complex128), ks)
        gap = (known[1] - ref)[known[0]].abs()
        stale.append(bool(gap.numel()) and float(gap.max()) > 1e-6 * float(ys.abs().max()))
        return _Bare.__getattr__(det, "residual_peaks")(xs, ks, ys, known)

    det.residual_peaks = spy
    xs, ks = det.detect_subtract(x, k, y, None, 40.0, marks)
    assert ks.tolist() == [int(d["k"][i]) + (1 if b == 0 else 0) for b, i in enumerate(idx)]
    assert tested[0] == 2 and tested[1] <= 1  # step 1: scenes 1 and 2; step 2: scene 2 only, if it gained again
    assert len(stale) == 2 and not any(stale)
    del det.prune_with_statistics, det.residual_peaks
    assert torch.equal(det.detect_subtract(x, k, y, None, 40.0)[1], d["k"][idx])
    junk = [bool(d["k"][i] < cfg.scene.k_max) and i % 2 == 0 for i in range(len(d["k"]))]
    xr, kr, marks = det.refined_peaks(*_junk_batch(cfg, d, range(len(d["k"])), junk))
    assert int(kr.sum()) == int(d["k"].sum()) and torch.equal(marks.known, kr >= 2)
    xa, ka = det.detect_subtract(xr, kr, d["y"], None, 40.0, marks)
    xb, kb = det.detect_subtract(xr, kr, d["y"], None, 40.0)
    assert torch.equal(ka, kb)
    torch.testing.assert_close(xa, xb, rtol=0.0, atol=1e-9)


def test_residual_candidates_take_the_known_residuals(setup, twelve):
    """``residual_peaks`` with some scenes' residuals given uses them (here a stand-in: scene 0's residual
    replaced by scene 1's own, whose candidate it then finds) and computes the others'."""
    cfg, system, _, _, _ = setup
    d = twelve
    det = _Bare(cfg, system)
    idx = _few(d, 2)
    x, k, y = _junk_batch(cfg, d, idx, [False, False])
    k = k - 1  # each scene's last source missing: the candidate
    full = det.residual_peaks(x, k, y)
    res = det.refiner.residual(x[:, :int(k.max())], y.to(torch.complex128), k)
    got = det.residual_peaks(x, k, y, (torch.tensor([True, False]), res[[1, 1]]))
    assert torch.equal(got[0][0], full[0][1]) and torch.equal(got[0][1], full[0][1])
    torch.testing.assert_close(got[2], full[2][[1, 1]], rtol=1e-12, atol=0.0)
    none = det.residual_peaks(x, k, y, (torch.tensor([False, False]), torch.zeros_like(res)))
    assert torch.equal(none[0], full[0])
    torch.testing.assert_close(none[2], full[2], rtol=1e-6, atol=0.0)
