"""Simulator: disjoint, reproducible splits; R_true / R_samp structure; SNR and channel scaling."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ris_model.config import ChannelConfig, GeometryConfig, RunConfig, SceneConfig
from ris_model.geometry import direction
from ris_model.music import single_threaded
from ris_model.simulate import make_system, sample_rng, simulate, subspace_energy_fraction

CFG = RunConfig()
SYSTEM = make_system(CFG)
# Split disjointness is a property of the seed streams, not of the array size: a 4x4 RIS, 4 antennas
# and 4 snapshots make thousands of samples cheap to draw.
SMALL = RunConfig(geometry=GeometryConfig(n_h=4, n_v=4, n_bs=4),
                  channel=ChannelConfig(snapshots=4, codebook_grid=(4, 4)))
HASH_FIELDS = ("k", "phi", "theta", "r", "powers", "snr_db", "y")


def sample_hashes(d: dict[str, torch.Tensor]) -> list[str]:
    """One content hash per sample over the scene parameters and the measurements."""
    out = []
    for b in range(d["y"].shape[0]):
        h = hashlib.sha256()
        for name in HASH_FIELDS:
            h.update(d[name][b].contiguous().numpy().tobytes())
        out.append(h.hexdigest())
    return out


def test_splits_are_disjoint_by_content():
    system = make_system(SMALL)
    hashes = {}
    for split in ("train", "val", "test"):
        hs = []
        for start in range(0, 2000, 500):
            hs += sample_hashes(simulate(SMALL, system, split, list(range(start, start + 500))))
        hashes[split] = set(hs)
        assert len(hashes[split]) == 2000, f"duplicate samples inside {split}"
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


_CHILD = textwrap.dedent("""
    import hashlib, torch
    from ris_model.config import RunConfig
    from ris_model.simulate import make_system, simulate
    cfg = RunConfig()
    d = simulate(cfg, make_system(cfg), "val", [0, 7, 123])
    h = hashlib.sha256()
    for name in sorted(d):
        h.update(d[name].contiguous().numpy().tobytes())
    print(h.hexdigest())
""")


def test_same_split_and_index_is_bit_identical_across_processes():
    d = simulate(CFG, SYSTEM, "val", [0, 7, 123])
    h = hashlib.sha256()
    for name in sorted(d):
        h.update(d[name].contiguous().numpy().tobytes())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # this checkout, from any folder
    child = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True, timeout=120,
                           env=env)
    assert child.stdout.strip() == h.hexdigest()


def test_a_sample_does_not_depend_on_its_batch():
    alone = simulate(CFG, SYSTEM, "train", [7])
    batch = simulate(CFG, SYSTEM, "train", [3, 7, 11])
    for name in HASH_FIELDS:
        assert torch.equal(alone[name][0], batch[name][1]), name
    assert torch.allclose(alone["R_samp"][0], batch["R_samp"][1], rtol=0, atol=1e-14)


def test_seed_changes_the_samples_and_the_channel():
    other = dataclasses.replace(CFG, data=dataclasses.replace(CFG.data, seed=1))
    assert not torch.equal(make_system(other).channel, SYSTEM.channel)
    a = simulate(CFG, SYSTEM, "train", [0])
    b = simulate(other, make_system(other), "train", [0])
    assert not torch.equal(a["y"], b["y"])


def test_sample_rng_rejects_bad_split_and_index():
    with pytest.raises(ValueError, match="valid splits"):
        sample_rng(0, "dev", 0)
    with pytest.raises(ValueError, match=">= 0"):
        sample_rng(0, "train", -1)


@pytest.fixture(scope="module")
def high_snr() -> dict[str, torch.Tensor]:
    cfg = dataclasses.replace(CFG, scene=dataclasses.replace(CFG.scene, snr_db=(20.0, 20.0)))
    return simulate(cfg, SYSTEM, "test", list(range(24)))


def test_r_true_is_hermitian_trace_one_rank_k(high_snr):
    R, k = high_snr["R_true"], high_snr["k"]
    assert torch.allclose(R, R.mH, atol=0)
    assert torch.allclose(torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1), torch.ones(R.shape[0], dtype=torch.float64))
    with single_threaded():
        ev = torch.linalg.eigvalsh(R).flip(-1)
    for b in range(R.shape[0]):
        kb = int(k[b])
        assert float(ev[b, kb - 1]) > 1e-6 and float(ev[b, kb:].abs().max()) < 1e-12
    a = SYSTEM.steer(high_snr["phi"], high_snr["theta"], high_snr["r"])
    frac = subspace_energy_fraction(R, a, high_snr["mask"])
    assert torch.allclose(frac, torch.ones_like(frac), atol=1e-10)


def test_r_samp_is_hermitian_trace_one_rank_at_most_l_and_informative(high_snr):
    R = high_snr["R_samp"]
    L = CFG.channel.snapshots
    assert torch.allclose(R, R.mH, atol=0)
    assert torch.allclose(torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1), torch.ones(R.shape[0], dtype=torch.float64))
    with single_threaded():
        ev = torch.linalg.eigvalsh(R).flip(-1)
    assert float(ev[:, L:].abs().max()) < 1e-12 and float(ev[:, L - 1].min()) > 1e-6
    a = SYSTEM.steer(high_snr["phi"], high_snr["theta"], high_snr["r"])
    frac = subspace_energy_fraction(R, a, high_snr["mask"])
    chance = high_snr["k"].double() / SYSTEM.n
    assert float(frac.mean()) > 3 * float(chance.mean())  # weak, but well above chance at 20 dB


def test_snr_sets_the_noise_power(high_snr):
    """E ||y_l||^2 / M = signal power + sigma^2 with signal = SNR * sigma^2 (pooled over samples)."""
    y, nv = high_snr["y"], high_snr["noise_var"]
    per_sample = (y.abs() ** 2).sum(-1).mean(-1) / y.shape[-1]
    ratio = float((per_sample / (nv * (1 + 10 ** 2.0))).mean())
    assert ratio == pytest.approx(1.0, abs=0.02)


def test_more_noise_less_information():
    fr = []
    for snr in (-5.0, 20.0):
        cfg = dataclasses.replace(CFG, scene=dataclasses.replace(CFG.scene, snr_db=(snr, snr)))
        d = simulate(cfg, SYSTEM, "test", list(range(16)))
        a = SYSTEM.steer(d["phi"], d["theta"], d["r"])
        fr.append(float(subspace_energy_fraction(d["R_samp"], a, d["mask"]).mean()))
    assert fr[0] < fr[1]


def test_channel_scaling_and_per_sample_option():
    m, n = SYSTEM.channel.shape
    assert (m, n) == (16, 144)
    assert float((SYSTEM.channel.abs() ** 2).sum()) == pytest.approx(m * n, rel=0.1)
    cfg = dataclasses.replace(CFG, channel=dataclasses.replace(CFG.channel, per_sample=True))
    d = simulate(cfg, make_system(cfg), "train", [0, 1])
    assert not torch.equal(d["channel"][0], d["channel"][1])
    fixed = simulate(CFG, SYSTEM, "train", [0, 1])
    assert torch.equal(fixed["channel"][0], fixed["channel"][1])


def test_scene_draws_respect_the_config():
    sc = SceneConfig(k_min=2, k_max=3, phi_deg=(-10.0, 10.0), theta_deg=(0.0, 5.0), range_m=(1.0, 2.0),
                     min_separation_deg=2.0, power_spread_db=6.0)
    cfg = dataclasses.replace(SMALL, scene=sc)
    d = simulate(cfg, make_system(cfg), "train", list(range(200)))
    m = d["mask"]
    assert set(d["k"].tolist()) == {2, 3}
    phi, theta = torch.rad2deg(d["phi"][m]), torch.rad2deg(d["theta"][m])
    assert float(phi.min()) >= -10 and float(phi.max()) <= 10 and float(theta.min()) >= 0 and float(theta.max()) <= 5
    assert float(d["r"][m].min()) >= 1.0 and float(d["r"][m].max()) <= 2.0
    u = direction(d["phi"], d["theta"])
    sep = torch.rad2deg(torch.arccos((u @ u.mT).clamp(-1, 1))) + 180 * ~(m[:, :, None] & m[:, None, :])
    sep = sep + 180 * torch.eye(sc.k_max, dtype=torch.bool)
    assert float(sep.min()) >= 2.0
    p = d["powers"][m]
    assert float(p.max()) <= 1.0 and float(p.min()) >= 10 ** -0.6 and float(p.min()) < 0.5
