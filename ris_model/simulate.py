"""Scenes, the BS-RIS channel, snapshots, R_true and R_samp (docs/physics.md section 2).

Randomness comes only from explicit numpy generators derived from (dataset seed, split, index) through
``numpy.random.SeedSequence`` spawn keys: the same (split, index) gives the same sample in every process,
and the split streams are disjoint. All physics is computed in float64/complex128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ris_model.complex_ops import hermitise, outer, trace_normalise
from ris_model.config import RunConfig, SceneConfig
from ris_model.geometry import bs_positions, codebook, direction, ris_positions, steering

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
_SYSTEM_STREAM = 1000


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``; disjoint streams per split (spawn keys)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown; valid splits: {', '.join(SPLITS)}")
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(SPLITS[split], index)))


@dataclass(frozen=True)
class System:
    """Fixed infrastructure of a dataset seed: arrays, codes, channel and its back-projection."""

    positions: Tensor  # (N, 3) float64, metres
    bs: Tensor  # (M, 3) float64
    codes: Tensor  # (L, N) complex128, unit modulus
    channel: Tensor  # (M, N) complex128, E||H||_F^2 = M N
    wavelength: float
    fresnel: bool

    @property
    def n(self) -> int:
        return self.positions.shape[0]

    def steer(self, phi: Tensor, theta: Tensor, r: Tensor) -> Tensor:
        return steering(self.positions, self.wavelength, phi, theta, r, fresnel=self.fresnel)


def rician_channel(cfg: RunConfig, rng: np.random.Generator) -> Tensor:
    """H = sqrt(k/(k+1)) H_LoS + sqrt(1/(k+1)) H_NLoS, both with E||.||_F^2 = M N (spherical-wave LoS)."""
    geo = cfg.geometry
    ris, bs = ris_positions(geo), bs_positions(geo)
    dist = torch.cdist(bs, ris)  # (M, N)
    los = torch.polar(torch.ones_like(dist), -2 * math.pi / geo.wavelength * dist)
    m, n = dist.shape
    nlos = torch.from_numpy((rng.standard_normal((m, n)) + 1j * rng.standard_normal((m, n))) / math.sqrt(2))
    kappa = cfg.channel.rician_k
    return math.sqrt(kappa / (kappa + 1)) * los + math.sqrt(1 / (kappa + 1)) * nlos


def make_system(cfg: RunConfig) -> System:
    rng = np.random.default_rng(np.random.SeedSequence(entropy=cfg.data.seed, spawn_key=(_SYSTEM_STREAM,)))
    return System(positions=ris_positions(cfg.geometry), bs=bs_positions(cfg.geometry),
                  codes=codebook(cfg.geometry, cfg.channel), channel=rician_channel(cfg, rng),
                  wavelength=cfg.geometry.wavelength, fresnel=cfg.geometry.fresnel)


@dataclass(frozen=True)
class Scene:
    k: int
    phi: np.ndarray  # (k,) radians, sorted ascending
    theta: np.ndarray  # (k,) radians
    r: np.ndarray  # (k,) metres
    powers: np.ndarray  # (k,) linear, max 1
    snr_db: float


def _angular_distance_deg(phi: np.ndarray, theta: np.ndarray) -> np.ndarray:
    u = direction(torch.from_numpy(phi), torch.from_numpy(theta)).numpy()
    cos = np.clip(u @ u.T, -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def sample_scene(rng: np.random.Generator, sc: SceneConfig, max_tries: int = 1000) -> Scene:
    k = int(rng.integers(sc.k_min, sc.k_max + 1))
    for _ in range(max_tries):
        phi = np.radians(rng.uniform(*sc.phi_deg, size=k))
        theta = np.radians(rng.uniform(*sc.theta_deg, size=k))
        if k == 1 or sc.min_separation_deg == 0:
            break
        dist = _angular_distance_deg(phi, theta) + np.eye(k) * 1e9
        if dist.min() >= sc.min_separation_deg:
            break
    else:
        raise ValueError(f"scene.min_separation_deg={sc.min_separation_deg} cannot be met for {k} sources "
                         f"in the field of view after {max_tries} draws; lower it")
    lo, hi = sc.range_m
    r = np.exp(rng.uniform(math.log(lo), math.log(hi), size=k))  # log-uniform: near field is where it is hard
    powers = 10 ** (-rng.uniform(0, sc.power_spread_db, size=k) / 10) if sc.power_spread_db > 0 else np.ones(k)
    snr_db = float(rng.uniform(*sc.snr_db))
    order = np.argsort(phi)
    return Scene(k, phi[order], theta[order], r[order], powers[order], snr_db)


def scene_tensors(scenes: list[Scene], k_max: int) -> dict[str, Tensor]:
    """Pad a list of scenes to K_MAX slots: phi/theta/r/powers (B, K_MAX) float64, mask (B, K_MAX), k (B,)."""
    b = len(scenes)
    out = {name: torch.zeros(b, k_max, dtype=torch.float64) for name in ("phi", "theta", "r", "powers")}
    out["r"].fill_(1.0)  # padded slots get a harmless finite range
    mask = torch.zeros(b, k_max, dtype=torch.bool)
    for i, s in enumerate(scenes):
        for name in ("phi", "theta", "r", "powers"):
            out[name][i, : s.k] = torch.from_numpy(getattr(s, name))
        mask[i, : s.k] = True
    out["mask"] = mask
    out["k"] = mask.sum(-1)
    out["snr_db"] = torch.tensor([s.snr_db for s in scenes], dtype=torch.float64)
    return out


def backprojection(phi_l: Tensor, eps_rel: float) -> Tensor:
    """G_l = Phi_l^H (Phi_l Phi_l^H + eps I)^-1 for Phi (..., L, M, N); eps relative to tr(Phi Phi^H)/M."""
    gram = phi_l @ phi_l.mH
    m = gram.shape[-1]
    eps = eps_rel * torch.diagonal(gram, dim1=-2, dim2=-1).real.mean(-1)
    eye = torch.eye(m, dtype=gram.dtype)
    return phi_l.mH @ torch.linalg.inv(gram + eps[..., None, None] * eye)


def true_covariance(a: Tensor, powers: Tensor, mask: Tensor) -> Tensor:
    """R_true = sum_k p_k a_k a_k^H, trace 1. a (B, K_MAX, N); padded slots carry zero power."""
    w = (powers * mask).to(a.dtype)
    return trace_normalise(hermitise(outer(a.transpose(-1, -2) * w[:, None, :].sqrt())), "R_true")


def sample_covariance(y: Tensor, g: Tensor) -> Tensor:
    """R_samp = (1/L) sum_l xhat_l xhat_l^H, xhat_l = G_l y_l; y (B, L, M), G (B|1, L, N, M); trace 1."""
    xhat = (g @ y[..., None])[..., 0]  # (B, L, N)
    r = xhat.transpose(-1, -2) @ xhat.conj() / y.shape[-2]
    return trace_normalise(hermitise(r), "R_samp")


def _symbols(rng: np.random.Generator, powers: np.ndarray, l: int, coherent: bool) -> np.ndarray:
    k = powers.shape[0]
    if coherent:  # one common symbol stream, a fixed phase per source: rank-1 data by construction
        common = (rng.standard_normal(l) + 1j * rng.standard_normal(l)) / math.sqrt(2)
        phase = np.exp(2j * math.pi * rng.uniform(size=(k, 1)))
        return np.sqrt(powers)[:, None] * phase * common[None, :]
    s = (rng.standard_normal((k, l)) + 1j * rng.standard_normal((k, l))) / math.sqrt(2)
    return np.sqrt(powers)[:, None] * s


def simulate(cfg: RunConfig, system: System, split: str, indices: list[int]) -> dict[str, Tensor]:
    """Simulate the samples ``indices`` of ``split``; every tensor in float64/complex128."""
    rngs = [sample_rng(cfg.data.seed, split, i) for i in indices]
    scenes = [sample_scene(rng, cfg.scene) for rng in rngs]
    t = scene_tensors(scenes, cfg.scene.k_max)
    a = system.steer(t["phi"], t["theta"], t["r"])  # (B, K_MAX, N)
    L = cfg.channel.snapshots
    if cfg.channel.per_sample:
        h = torch.stack([rician_channel(cfg, rng) for rng in rngs])  # (B, M, N)
    else:
        h = system.channel[None]
    phi_l = h[:, None] * system.codes[None, :, None, :]  # (B|1, L, M, N): H diag(c_l)
    s = torch.zeros(len(indices), cfg.scene.k_max, L, dtype=torch.complex128)
    for i, (rng, sc) in enumerate(zip(rngs, scenes)):
        s[i, : sc.k] = torch.from_numpy(_symbols(rng, sc.powers, L, cfg.scene.coherent))
    x = s.transpose(-1, -2) @ a  # (B, L, N): field at the RIS per snapshot
    clean = (phi_l @ x[..., None])[..., 0]  # (B, L, M)
    m = clean.shape[-1]
    sig = (clean.abs() ** 2).sum(-1).mean(-1) / m
    noise_var = sig / 10 ** (t["snr_db"] / 10)
    noise = torch.stack([torch.from_numpy(rng.standard_normal((L, m)) + 1j * rng.standard_normal((L, m)))
                         for rng in rngs]) / math.sqrt(2)
    y = clean + noise * noise_var.sqrt()[:, None, None]
    g = backprojection(phi_l, cfg.channel.backproj_eps)
    return dict(t, y=y, codes=system.codes.expand(len(indices), -1, -1), channel=h.expand(len(indices), -1, -1),
                noise_var=noise_var, R_true=true_covariance(a, t["powers"], t["mask"]),
                R_samp=sample_covariance(y, g), index=torch.tensor(indices, dtype=torch.int64))


def subspace_energy_fraction(R: Tensor, a: Tensor, mask: Tensor) -> Tensor:
    """Fraction of tr(R) inside span{a_k} (the information content of R_samp); chance level is K/N.

    R (B, N, N) trace 1; a (B, K_MAX, N) steering vectors, mask (B, K_MAX) marks the real sources.
    """
    basis = a.transpose(-1, -2) * mask[:, None, :].to(a.dtype)  # (B, N, K_MAX), padded columns zero
    q, rr = torch.linalg.qr(basis)
    keep = (torch.diagonal(rr, dim1=-2, dim2=-1).abs() > 1e-9).to(q.dtype)
    q = q * keep[:, None, :]
    return torch.einsum("bnk,bnm,bmk->b", q.conj(), R, q).real / torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1)
