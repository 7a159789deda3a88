"""The network: named outputs and shapes, bounds, determinism, size, and no dead parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ris_model.config import load_config
from ris_model.data import train_batch
from ris_model.loss import CompositeLoss
from ris_model.model import ModelOutputs, build_model, cell_grid, count_parameters
from ris_model.simulate import make_system

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "model.factor_hidden=32",
        "model.code_dim=8", "model.beam_grid=[4,2,2]", "model.readout_grid=[8,4,2]", "data.batch_size=6"]
VARIANTS = {
    "steering+spectral": [],
    "steering+regress": ['model.position_head="regress"'],
    "direct+spectral": ['model.factor_head="direct"'],
    "no-beam-feature": ["model.beam_grid=[0,0,0]"],
    "per-sample-channel": ["channel.per_sample=true"],
}




def _run(extra):
    cfg = load_config(None, TINY + extra)
    system = make_system(cfg)
    model = build_model(cfg, system)
    batch = train_batch(cfg, system, 0)
    return cfg, system, model, batch, model(batch)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_named_outputs_shapes_and_bounds(variant):
    cfg, _, _, batch, out = _run(VARIANTS[variant])
    b, n, k = batch.size, cfg.geometry.n_ris, cfg.scene.k_max
    assert isinstance(out, ModelOutputs) and set(out.as_dict()) == {"cov_fact_angle", "cov_fact_range", "k_logits", "aux"}
    assert out.cov_fact_angle.shape == out.cov_fact_range.shape == (b, n, k)
    assert out.cov_fact_angle.dtype == torch.complex64 and out.k_logits.shape == (b, k) and out.aux.shape == (b, k, 3)
    sc = cfg.scene
    phi, theta, r = (out.aux[..., i] for i in range(3))
    eps = 1e-5
    assert torch.all(phi.rad2deg() >= sc.phi_deg[0] - eps) and torch.all(phi.rad2deg() <= sc.phi_deg[1] + eps)
    assert torch.all(theta.rad2deg() >= sc.theta_deg[0] - eps) and torch.all(theta.rad2deg() <= sc.theta_deg[1] + eps)
    assert torch.all(r >= sc.range_m[0] * (1 - eps)) and torch.all(r <= sc.range_m[1] * (1 + eps))


def test_steering_factors_are_steering_vectors_at_aux():
    cfg, system, _, _, out = _run([])
    a = system.steer(out.aux[..., 0].double(), out.aux[..., 1].double(), out.aux[..., 2].double())  # (B, K, N)
    f = out.cov_fact_angle.transpose(-1, -2).to(torch.complex128)
    coherence = (a.conj() * f).sum(-1).abs() / f.abs().pow(2).sum(-1).sqrt()
    assert torch.allclose(coherence, torch.ones_like(coherence), atol=1e-4)


@pytest.mark.parametrize("variant", ["steering+spectral", "direct+spectral", "steering+regress", "per-sample-channel"])
def test_every_parameter_receives_gradient(variant):
    """A dead head is a failing test: the default loss must reach every parameter."""
    cfg, system, model, batch, out = _run(VARIANTS[variant])
    total, _ = CompositeLoss(cfg, system)(out, batch)
    total.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert dead == []


def test_same_seed_same_weights_and_seed_changes_them():
    cfg = load_config(None, TINY)
    system = make_system(cfg)
    a, b = build_model(cfg, system), build_model(cfg, system)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_model(load_config(None, TINY + ["train.seed=1"]), system)
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    state = torch.get_rng_state()
    build_model(cfg, system)
    assert torch.equal(state, torch.get_rng_state())  # building a model leaves the global RNG alone


def test_default_size_is_one_to_three_million_and_quickstart_small():
    for path, lo, hi in ((str(CONFIG_DIR / "default.toml"), 1e6, 3e6), (str(CONFIG_DIR / "quickstart.toml"), 5e4, 5e5)):
        cfg = load_config(path)
        assert lo <= count_parameters(build_model(cfg, make_system(cfg))) <= hi, path


def test_spectral_readout_starts_near_bartlett_peaks():
    """At initialisation slot 0 sits near the strongest peak of the Bartlett spectrum of R_samp."""
    cfg, system, _, batch, out = _run(["data.batch_size=8"])
    phi, theta, r = cell_grid(cfg.scene, (60, 30, 12))
    a = system.steer(phi, theta, r)  # (G, N)
    bart = torch.einsum("gn,bnm,gm->bg", a.conj(), batch.R_samp.to(torch.complex128), a).real
    best = bart.argmax(-1)
    d_phi = (out.aux[:, 0, 0].detach().double() - phi[best]).rad2deg().abs()
    assert float(d_phi.median()) < 8.0  # within a readout cell (7.5 deg here) of the peak


def test_float64_model():
    cfg, _, model, batch, out = _run(['data.dtype="float64"'])
    assert out.cov_fact_angle.dtype == torch.complex128 and all(p.dtype == torch.float64 for p in model.parameters())


def test_bf16_autocast_keeps_heads_and_factors_in_fp32():
    cfg, _, model, batch, ref = _run([])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out.aux.dtype == torch.float32 and out.k_logits.dtype == torch.float32
    assert out.cov_fact_angle.dtype == torch.complex64
    assert (out.aux - ref.aux).abs().max().item() < 0.05  # only the encoder ran in bf16
