"""Measurement-domain ML estimator: exact Jacobian, recovery of planted sources, model order on its residuals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.func import jacfwd

from ris_model.config import RunConfig
from ris_model.ml_estimator import (MLConfig, MLEstimator, MLError, energy, levenberg_marquardt, operators,
                                    residual_and_jacobian, residual_vector, whitener, _box)
from ris_model.model_order import mdl_residual, residual_drop, threshold_k
from ris_model.simulate import make_system, simulate

COARSE = MLConfig(grid_step_deg=4.0, n_range=10)  # small dictionary: the tests stay fast


@pytest.fixture(scope="module")
def setup():
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, scene=dataclasses.replace(cfg.scene, snr_db=(30.0, 30.0)))
    system = make_system(cfg)
    return cfg, system, simulate(cfg, system, "test", list(range(6)))


def test_jacobian_matches_autograd(setup):
    """The variable-projection Jacobian (both terms) equals forward-mode autograd of the residual."""
    cfg, system, d = setup
    phis = operators(system.channel[None], system.codes[None])
    x = torch.tensor([[[0.3, 0.1, 0.2], [-0.2, 0.05, 1.0], [0.6, -0.3, -0.5]]], dtype=torch.float64)
    _, jac = residual_and_jacobian(x, phis, d["y"][:1], system)
    ref = jacfwd(lambda v: residual_vector(v, phis[0], d["y"][0], system))(x[0])  # (2 L M, k, 3)
    got = torch.view_as_real(jac[0]).permute(0, 1, 4, 2, 3).reshape(ref.shape)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9 * float(ref.abs().max()))


def test_lm_from_the_truth_stays_at_the_ml_minimum(setup):
    """Started at the truth, the refinement lowers the cost and moves by less than a degree at 30 dB."""
    cfg, system, d = setup
    phis = operators(system.channel[None], system.codes[None])
    lo, hi = _box(cfg.scene)
    i = int(torch.nonzero(d["k"] == d["k"].max())[0])
    k = int(d["k"][i])
    x0 = torch.stack([d["phi"][i, :k], d["theta"][i, :k], d["r"][i, :k].log()], -1)[None]
    x = levenberg_marquardt(x0, phis, d["y"][i:i + 1], system, lo, hi, 30)
    assert float(energy(x, phis, d["y"][i:i + 1], system)) <= float(energy(x0, phis, d["y"][i:i + 1], system))
    assert float(torch.rad2deg((x - x0)[..., :2]).abs().max()) < 1.0


def test_recovers_planted_sources_and_k(setup):
    """Nested fits from a coarse 4-degree grid: with the true K every source within 0.5 deg at 30 dB, and the
    residual MDL picks the true K (the noise plateau e_k ~ L (M - k) sigma^2 for k >= K)."""
    cfg, system, d = setup
    est = MLEstimator(system, system.channel, system.codes, cfg.scene, COARSE)
    path = est.path(d["y"])
    L, m = d["y"].shape[-2:]
    k_hat = mdl_residual(path.energy, L, m)
    assert torch.equal(k_hat, d["k"])
    e = path.estimates(d["k"], cfg.scene.k_max)
    from ris_model.scoring import score, truth_from
    s = score("ml", e, truth_from(d, system, with_crb=False))
    assert s.matched[d["mask"].numpy()].all()
    errs = s.err[..., :2][s.matched]
    assert float(errs.max()) < 0.5
    plateau = path.energy / (L * (m - torch.arange(cfg.scene.k_max + 1)) * d["noise_var"][:, None])
    for b in range(d["k"].shape[0]):
        assert 0.5 < float(plateau[b, d["k"][b]]) < 1.5  # noise only once k = K


def test_whitener_equalises_the_prior_signal_covariance():
    g = torch.Generator().manual_seed(0)
    phis = torch.randn(1, 3, 4, 20, dtype=torch.complex128, generator=g)
    w = whitener(phis, 0.0)
    c = w @ (phis @ phis.mH / 20) @ w.mH
    torch.testing.assert_close(c, torch.eye(4, dtype=c.dtype).expand_as(c), rtol=0, atol=1e-9)


def test_rejects_bad_measurement_shapes(setup):
    cfg, system, d = setup
    est = MLEstimator(system, system.channel, system.codes, cfg.scene, COARSE)
    with pytest.raises(MLError, match=r"\(B, L, M\)"):
        est.path(d["y"][:, :3])


# --------------------------------------------------------------------------- model order on the residuals

def plateau_energy(k_true: int, k_max: int = 5, L: int = 16, m: int = 16, gain: float = 50.0) -> torch.Tensor:
    """e_0..e_kmax: each true source removes `gain` x the noise plateau; then only noise dofs are removed."""
    e = [L * (m - k) + gain * L * max(k_true - k, 0) for k in range(k_max + 1)]
    return torch.tensor([e], dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_mdl_and_threshold_find_k_on_a_noise_plateau(k):
    e = plateau_energy(k)
    assert int(mdl_residual(e, 16, 16)) == k
    assert int(threshold_k(e, 16, 16, tau=40.0)) == k


def test_threshold_is_at_least_one_and_drop_is_noise_level_on_the_plateau():
    e = plateau_energy(2)
    drop = residual_drop(e, 16, 16)
    # past K a spurious source absorbs one noise dof per snapshot: drop = L = 16 on an exact plateau
    torch.testing.assert_close(drop[0, 2:], torch.full((3,), 16.0, dtype=torch.float64))
    assert float(drop[0, :2].min()) > 100
    assert int(threshold_k(e, 16, 16, tau=math.inf)) == 1
