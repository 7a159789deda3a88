"""Array geometry, THE steering vector, the RIS codebook and the MUSIC search grids.

Conventions (docs/physics.md section 1): the RIS lies in the z = 0 plane, centred at the origin, positions in
metres, flat index n = j * n_h + i (horizontal fastest). Angles are in RADIANS in every function here;
configs hold degrees and are converted at the edges. A source at (phi, theta, r) sits at p = r u with
u = (sin phi cos theta, sin theta, cos phi cos theta).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ris_model.config import ChannelConfig, GeometryConfig, MusicConfig, SceneConfig
from ris_model.complex_ops import complex_dtype


def ris_positions(cfg: GeometryConfig, dtype: torch.dtype = torch.float64) -> Tensor:
    """Centred UPA element positions, shape (N, 3), metres."""
    d = cfg.spacing_wavelengths * cfg.wavelength
    i = (torch.arange(cfg.n_h, dtype=dtype) - (cfg.n_h - 1) / 2) * d
    j = (torch.arange(cfg.n_v, dtype=dtype) - (cfg.n_v - 1) / 2) * d
    y, x = torch.meshgrid(j, i, indexing="ij")  # row = j (vertical), column = i (horizontal fastest)
    return torch.stack([x.reshape(-1), y.reshape(-1), torch.zeros(cfg.n_ris, dtype=dtype)], dim=-1)


def bs_positions(cfg: GeometryConfig, dtype: torch.dtype = torch.float64) -> Tensor:
    """BS uniform linear array (M, 3): horizontal, broadside facing the RIS, at bs_distance_m / bs_azimuth_deg."""
    d = cfg.bs_spacing_wavelengths * cfg.wavelength
    az = math.radians(cfg.bs_azimuth_deg)
    centre = torch.tensor([math.sin(az), 0.0, math.cos(az)], dtype=dtype) * cfg.bs_distance_m
    axis = torch.tensor([math.cos(az), 0.0, -math.sin(az)], dtype=dtype)  # perpendicular to the RIS direction
    offs = (torch.arange(cfg.n_bs, dtype=dtype) - (cfg.n_bs - 1) / 2) * d
    return centre + offs[:, None] * axis


def direction(phi: Tensor, theta: Tensor) -> Tensor:
    """Unit direction (..., 3) for azimuth phi and elevation theta (radians)."""
    ct = torch.cos(theta)
    return torch.stack(torch.broadcast_tensors(torch.sin(phi) * ct, torch.sin(theta), torch.cos(phi) * ct), dim=-1)


def path_difference(positions: Tensor, phi: Tensor, theta: Tensor, r: Tensor, fresnel: bool = False) -> Tensor:
    """||p - p_n|| - r for every element: (..., N). Exact form computed without cancellation."""
    u = direction(phi, theta)  # (..., 3)
    positions = positions.to(device=u.device, dtype=u.dtype)  # the system lives on the CPU, angles anywhere
    up = u @ positions.T  # (..., N): u . p_n
    pn2 = (positions**2).sum(-1)  # (N,)
    r = r[..., None]
    if fresnel:
        return -up + (pn2 - up**2) / (2 * r)
    # ||p - p_n||^2 - r^2 = ||p_n||^2 - 2 r u.p_n, divided by (||p - p_n|| + r): no large-number cancellation
    num = pn2 - 2 * r * up
    return num / (torch.sqrt(r**2 + num) + r)


def steering(positions: Tensor, wavelength: float, phi: Tensor, theta: Tensor, r: Tensor,
             fresnel: bool = False) -> Tensor:
    """THE steering vector: a_n = exp(-j k0 (||p - p_n|| - r)) / sqrt(N), shape (..., N), unit norm.

    phi, theta (radians) and r (metres) broadcast against each other; the output is complex with the
    precision of their real dtype. Used by the simulator, the loss and MUSIC alike.
    """
    phi, theta, r = torch.broadcast_tensors(phi, theta, r)
    k0 = 2 * math.pi / wavelength
    delta = path_difference(positions, phi, theta, r, fresnel=fresnel)
    n = positions.shape[0]
    phase = -k0 * delta
    return torch.polar(torch.full_like(phase, 1.0 / math.sqrt(n)), phase).to(complex_dtype(phase.dtype))


def plane_wave(positions: Tensor, wavelength: float, phi: Tensor, theta: Tensor) -> Tensor:
    """Far-field limit of ``steering`` (r -> inf): exp(+j k0 u . p_n) / sqrt(N). Only for tests and docs."""
    u = direction(phi, theta)
    k0 = 2 * math.pi / wavelength
    phase = k0 * (u @ positions.T.to(u.dtype))
    return torch.polar(torch.full_like(phase, 1.0 / math.sqrt(positions.shape[0])), phase)


def codebook(geo: GeometryConfig, ch: ChannelConfig) -> Tensor:
    """L unit-modulus RIS codes (L, N) from a 2-D DFT beam grid, sub-sampled evenly along both axes.

    The full grid has gx x gy beams with sine-space directions spread over [-1, 1); the L codes are a
    strided sx x sy sub-grid (sx = ceil(sqrt(L))) so that both axes are covered. Optional b-bit phase
    quantisation rounds each phase to a multiple of 2 pi / 2^b.
    """
    gx, gy = ch.codebook_grid
    L = ch.snapshots
    sx = math.ceil(math.sqrt(L))
    sy = math.ceil(L / sx)
    if sx > gx or sy > gy:
        raise ValueError(f"channel.codebook_grid={ch.codebook_grid} has fewer than the {sx}x{sy} beams needed "
                         f"for channel.snapshots={L}; enlarge the grid")
    ix = (torch.arange(sx) * gx) // sx
    iy = (torch.arange(sy) * gy) // sy
    ux = -1 + (2 * ix.double() + 1) / gx
    uy = -1 + (2 * iy.double() + 1) / gy
    pos = ris_positions(geo)
    k0 = 2 * math.pi / geo.wavelength
    beams = [(a, b) for b in uy for a in ux][:L]
    phase = torch.stack([k0 * (a * pos[:, 0] + b * pos[:, 1]) for a, b in beams])  # (L, N)
    if ch.phase_bits > 0:
        q = 2 * math.pi / 2**ch.phase_bits
        phase = torch.round(phase / q) * q
    return torch.polar(torch.ones_like(phase), phase)


def search_grid(scene: SceneConfig, music: MusicConfig, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """MUSIC grid axes: phi and theta (radians, uniform in degrees) and r (metres, log-spaced planes)."""
    def axis(lo: float, hi: float, step: float) -> Tensor:
        n = int(math.floor((hi - lo) / step + 1e-9)) + 1
        return torch.deg2rad(lo + step * torch.arange(n, dtype=dtype))

    phi = axis(*scene.phi_deg, music.phi_step_deg)
    theta = axis(*scene.theta_deg, music.theta_step_deg)
    lo, hi = scene.range_m
    r = torch.logspace(math.log10(lo), math.log10(hi), music.n_range, dtype=dtype)
    return phi, theta, r
