"""Cramer-Rao bound: textbook closed forms, positivity and monotonicity, the batched helper."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ris_model.config import GeometryConfig, RunConfig
from ris_model.crb import CRBError, crb, crb_batch, rms_bound, slepian_bangs_fim
from ris_model.geometry import plane_wave, ris_positions
from ris_model.simulate import System, make_system, simulate

CFG = RunConfig()
SYSTEM = make_system(CFG)


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def stochastic_crb_single_source(d: torch.Tensor, a: torch.Tensor, p: float, noise: float, t: int) -> torch.Tensor:
    """Stoica & Nehorai (1990) unconditional CRB for ONE source, y = a s + n, unknown p and sigma^2:
    CRB(eta) = sigma^2 / (2T) * (p^2 a^H R^-1 a)^-1 * Re(D^H P_a^perp D)^-1, with
    a^H R^-1 a = ||a||^2 / (sigma^2 + p ||a||^2)."""
    na2 = float(torch.vdot(a, a).real)
    perp = torch.eye(a.shape[0], dtype=a.dtype) - torch.outer(a, a.conj()) / na2
    m = (d.mH @ perp @ d).real
    gain = p**2 * na2 / (noise + p * na2)
    return noise / (2 * t) / gain * torch.linalg.inv(m)


def test_ula_far_field_textbook_bound():
    """ULA, plane wave, one source, full observation: CRB(phi) = sigma^2 (sigma^2 + p N) /
    (2 T p^2 N pi^2 cos^2 phi sum m^2) for a_m = exp(j pi m sin phi), centred m."""
    n, phi0, p, noise, t = 16, 0.4, 1.0, 0.3, 25
    pos = ris_positions(GeometryConfig(n_h=n, n_v=1))
    lam = GeometryConfig().wavelength
    eye = torch.eye(n, dtype=torch.complex128)

    def cov(eta: torch.Tensor) -> torch.Tensor:
        a = plane_wave(pos, lam, eta[0], torch.zeros((), dtype=torch.float64)) * math.sqrt(n)  # unnormalised
        return (eta[1] * torch.outer(a, a.conj()) + eta[2] * eye)[None]

    fim = slepian_bangs_fim(cov, _t(phi0, p, noise), _t(t))
    var = torch.linalg.inv(fim)[0, 0]
    m = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    closed = noise * (noise + p * n) / (2 * t * p**2 * n * math.pi**2 * math.cos(phi0) ** 2 * float((m**2).sum()))
    assert float(var) == pytest.approx(closed, rel=1e-9)


def test_near_field_full_observation_matches_the_single_source_formula():
    """crb() itself with Phi = I (M = N): the same closed form with D from central differences."""
    n = SYSTEM.n
    ident = System(positions=SYSTEM.positions, bs=SYSTEM.bs, codes=torch.ones(1, n, dtype=torch.complex128),
                   channel=torch.eye(n, dtype=torch.complex128), wavelength=SYSTEM.wavelength, fresnel=False)
    x0, p, noise, t = (0.3, -0.2, 2.0), 1.0, 0.5, 10
    out = crb(ident, _t(x0[0]), _t(x0[1]), _t(x0[2]), _t(p), noise, t)

    def a(*x: float) -> torch.Tensor:
        return SYSTEM.steer(*(_t(v) for v in x))[0]

    h = 1e-6
    cols = []
    for i in range(3):
        up, dn = list(x0), list(x0)
        up[i] += h
        dn[i] -= h
        cols.append((a(*up) - a(*dn)) / (2 * h))
    ref = stochastic_crb_single_source(torch.stack(cols, -1), a(*x0), p, noise, t).diagonal().sqrt()
    got = torch.cat([torch.deg2rad(out["phi_deg"]), torch.deg2rad(out["theta_deg"]), out["r_m"]])
    assert torch.allclose(got, ref, rtol=1e-6)


SCENE3 = dict(phi=_t(-0.5, 0.1, 0.7), theta=_t(0.2, -0.3, 0.0), r=_t(0.8, 3.0, 7.0), powers=_t(1.0, 0.5, 2.0))


def test_bound_is_positive_and_decreases_with_snr():
    stds = [crb(SYSTEM, **SCENE3, noise_var=nv) for nv in (10.0, 1.0, 0.1, 0.01)]
    for key in ("phi_deg", "theta_deg", "r_m"):
        vals = torch.stack([s[key] for s in stds])
        assert bool((vals > 0).all() and torch.isfinite(vals).all())
        assert bool((vals[1:] < vals[:-1]).all()), key


def test_bound_decreases_with_the_number_of_snapshots():
    stds = [crb(SYSTEM, **SCENE3, noise_var=0.1, snapshots=L) for L in (4, 8, 16, 32)]
    for key in ("phi_deg", "theta_deg", "r_m"):
        vals = torch.stack([s[key] for s in stds])
        assert bool((vals[1:] < vals[:-1]).all()), key
    # cycling through the codebook twice is two i.i.d. repetitions: variance halves exactly
    ratio = stds[3]["phi_deg"] / stds[2]["phi_deg"]
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / math.sqrt(2)), rtol=1e-9)


def test_fisher_information_is_symmetric_positive_definite():
    out = crb(SYSTEM, **SCENE3, noise_var=0.1)
    fim = out["fim"]
    assert fim.shape == (13, 13)
    assert torch.allclose(fim, fim.T, rtol=1e-10, atol=0)
    assert float(torch.linalg.eigvalsh(fim).min()) > 0
    assert torch.allclose(out["cov"] @ fim, torch.eye(13, dtype=torch.float64), atol=1e-6)


def test_zero_power_source_is_not_identifiable():
    with pytest.raises(CRBError, match="not identifiable"):
        crb(SYSTEM, _t(0.1, 0.5), _t(0.0, 0.1), _t(2.0, 3.0), _t(1.0, 0.0), 0.1)


def test_inconsistent_shapes_are_rejected():
    with pytest.raises(CRBError, match=r"\(K,\)"):
        crb(SYSTEM, _t(0.1, 0.5), _t(0.0), _t(2.0, 3.0), _t(1.0, 1.0), 0.1)


def test_batch_helper_matches_the_single_scene_bound():
    cfg = dataclasses.replace(CFG, scene=dataclasses.replace(CFG.scene, snr_db=(10.0, 10.0)))
    d = simulate(cfg, SYSTEM, "test", list(range(3)))
    out = crb_batch(d, SYSTEM)
    assert out["phi_deg"].shape == d["mask"].shape
    assert bool((out["phi_deg"][~d["mask"]] == 0).all())
    assert bool((out["r_m"][d["mask"]] > 0).all())
    b, m = 2, d["mask"][2]
    one = crb(SYSTEM, d["phi"][b][m], d["theta"][b][m], d["r"][b][m], d["powers"][b][m], d["noise_var"][b])
    assert torch.allclose(out["theta_deg"][b][m], one["theta_deg"])
    assert rms_bound(out["r_m"], d["mask"]) == pytest.approx(
        math.sqrt(float((out["r_m"][d["mask"]] ** 2).mean())))
