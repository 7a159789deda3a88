"""Geometry: positions, THE steering vector (norm, far-field and Fresnel limits), codebook, grids."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ris_model.config import ChannelConfig, GeometryConfig, MusicConfig, SceneConfig
from ris_model.geometry import (codebook, direction, path_difference, plane_wave, ris_positions, search_grid,
                                steering)

GEO = GeometryConfig()
POS = ris_positions(GEO)
LAM = GEO.wavelength


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def test_positions_are_centred_metres_horizontal_fastest():
    d = 0.5 * LAM
    assert POS.shape == (144, 3)
    assert torch.allclose(POS.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-15)
    assert POS[1, 0] - POS[0, 0] == pytest.approx(d)  # n = j * n_h + i: i (x) runs fastest
    assert POS[12, 1] - POS[0, 1] == pytest.approx(d)
    assert POS[0, 0] == pytest.approx(-5.5 * d) and POS[143, 1] == pytest.approx(5.5 * d)
    assert torch.all(POS[:, 2] == 0)


def test_direction_matches_the_domain_convention():
    u = direction(_t(math.radians(30)), _t(math.radians(-20)))[0]
    c = math.cos(math.radians(-20))
    assert u.tolist() == pytest.approx([0.5 * c, math.sin(math.radians(-20)), math.cos(math.radians(30)) * c])


@settings(max_examples=40, deadline=None)
@given(phi=st.floats(-60, 60), theta=st.floats(-30, 30), r=st.floats(0.5, 10.0),
       fresnel=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_steering_has_unit_norm(phi, theta, r, fresnel, dtype):
    a = steering(POS.to(dtype), LAM, torch.tensor(math.radians(phi), dtype=dtype),
                 torch.tensor(math.radians(theta), dtype=dtype), torch.tensor(r, dtype=dtype), fresnel=fresnel)
    assert a.dtype == (torch.complex64 if dtype == torch.float32 else torch.complex128)
    tol = 10 * torch.finfo(dtype).eps * 144
    assert abs(float(torch.vdot(a, a).real) - 1.0) < tol
    assert float(torch.vdot(a, a).imag) == 0.0


def test_steering_broadcasts_over_sources_and_grids():
    a = steering(POS, LAM, torch.zeros(4, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64),
                 torch.ones(4, 1, dtype=torch.float64))
    assert a.shape == (4, 3, 144)


def test_phase_is_referenced_to_the_array_centre():
    # an element at the centre would see ||p|| - r = 0: the two central elements are symmetric about it
    a = steering(POS, LAM, _t(0.0), _t(0.0), _t(1.0))[0]
    assert torch.allclose(a, a.flip(0), atol=1e-14)  # n -> 143 - n maps p_n to -p_n


@pytest.mark.parametrize("phi_deg,theta_deg", [(0, 0), (40, 20), (-55, -25)])
def test_far_field_limit_is_the_plane_wave_with_error_shrinking_like_1_over_r(phi_deg, theta_deg):
    phi, theta = _t(math.radians(phi_deg)), _t(math.radians(theta_deg))
    pw = plane_wave(POS, LAM, phi, theta)

    def err(r: float) -> float:
        return float((steering(POS, LAM, phi, theta, _t(r)) - pw).abs().max())

    e1, e2 = err(2e3), err(4e3)
    assert err(1e5) < 1e-3 / math.sqrt(144)
    assert e1 / e2 == pytest.approx(2.0, rel=0.02)  # the Fresnel (1/r) term is the leading error


@pytest.mark.parametrize("phi_deg,theta_deg", [(40, 20), (-55, 25), (10, -30)])
def test_fresnel_matches_exact_to_second_order(phi_deg, theta_deg):
    """The neglected third-order term of ||p - p_n|| - r is O(1/r^2): doubling r quarters the error."""
    phi, theta = _t(math.radians(phi_deg)), _t(math.radians(theta_deg))

    def phase_err(r: float) -> float:
        a = steering(POS, LAM, phi, theta, _t(r))
        b = steering(POS, LAM, phi, theta, _t(r), fresnel=True)
        return float(torch.angle(b * a.conj()).abs().max())

    e = [phase_err(r) for r in (20.0, 40.0, 80.0)]
    assert e[0] / e[1] == pytest.approx(4.0, rel=0.1)
    assert e[1] / e[2] == pytest.approx(4.0, rel=0.05)
    assert phase_err(0.5) > 0.1  # in the near field the approximation is visibly off


@pytest.mark.parametrize("r", [10.0, 20.0])
def test_fresnel_keeps_the_u_dot_p_squared_term(r):
    """The -(u.p)^2 / 2r term (~11 rad at 0.5 m, 60 deg: docs/physics.md section 1) is in the option: its error
    against the exact path is far below what forgetting that term would cost."""
    phi, theta = _t(math.radians(60)), _t(0.0)
    k0 = 2 * math.pi / LAM
    up = POS @ direction(phi, theta)[0]
    assert float((k0 * up**2 / (2 * 0.5)).max()) > 10.0
    forgotten = float((k0 * up**2 / (2 * r)).max())
    err = k0 * (path_difference(POS, phi, theta, _t(r), fresnel=True) - path_difference(POS, phi, theta, _t(r)))
    assert float(err.abs().max()) < forgotten / 5


def test_conjugate_plane_wave_is_the_mirrored_direction():
    """Why a conjugation bug is silent in the far field: conj(a(phi, theta)) = a(-phi, -theta)."""
    a = plane_wave(POS, LAM, _t(0.3), _t(0.2))
    b = plane_wave(POS, LAM, _t(-0.3), _t(-0.2))
    assert torch.allclose(a.conj(), b, atol=1e-14)


@pytest.mark.parametrize("bits", [0, 3])
def test_codebook_unit_modulus_even_coverage_and_quantisation(bits):
    ch = ChannelConfig(phase_bits=bits)
    c = codebook(GEO, ch)
    assert c.shape == (16, 144)
    assert torch.allclose(c.abs(), torch.ones_like(c.abs()), atol=1e-14)
    assert torch.linalg.matrix_rank(c) == 16  # 16 distinct beams
    if bits:
        step = 2 * math.pi / 2**bits
        k = torch.angle(c) / step
        assert torch.allclose(k, k.round(), atol=1e-9)
    else:  # beams on a 4 x 4 sub-grid: the x and y phase slopes take 4 distinct values each
        ph = torch.angle(c[:, 1] * c[:, 0].conj())
        pv = torch.angle(c[:, 12] * c[:, 0].conj())
        assert len(set(ph.round(decimals=6).tolist())) == 4 and len(set(pv.round(decimals=6).tolist())) == 4


def test_codebook_too_small_is_rejected():
    with pytest.raises(ValueError, match="codebook_grid"):
        codebook(GEO, ChannelConfig(codebook_grid=(2, 2)))


def test_search_grid_default_size_and_log_range_planes():
    phi, theta, r = search_grid(SceneConfig(), MusicConfig())
    assert (phi.shape[0], theta.shape[0], r.shape[0]) == (241, 121, 24)
    assert math.degrees(float(phi[0])) == pytest.approx(-60) and math.degrees(float(phi[-1])) == pytest.approx(60)
    assert float(r[0]) == pytest.approx(0.5) and float(r[-1]) == pytest.approx(10.0)
    ratio = r[1:] / r[:-1]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
