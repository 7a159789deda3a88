"""The learned detector: targets, loss, decoding of a synthetic heatmap, permutation invariance, determinism,
checkpoint loading."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ris_model.config import RunConfig
from ris_model.detector import DetectorConfig, HeatNet, decode, detector_loss, log_map, targets

SCENE = RunConfig().scene
STEP = 3.0
SHAPE = (41, 21)  # phi -60..60, theta -30..30 at 3 deg


def _sources() -> tuple[torch.Tensor, ...]:
    phi = torch.deg2rad(torch.tensor([[-40.0, 10.5, 31.0, 0.0, 0.0]], dtype=torch.float64))
    theta = torch.deg2rad(torch.tensor([[5.0, -20.0, 12.2, 0.0, 0.0]], dtype=torch.float64))
    r = torch.tensor([[0.7, 3.0, 8.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False]])
    return phi, theta, r, mask


def _perfect_output(phi, theta, r, mask) -> torch.Tensor:
    """A network output that puts a confident peak with exact offsets at every source's cell."""
    heat, reg, pos = targets(phi, theta, r, mask, SHAPE, SCENE, STEP, 1.0)
    logit = torch.where(pos, torch.full_like(heat, 8.0), torch.full_like(heat, -8.0))
    return torch.cat([logit[:, None], reg], 1)


def test_targets_put_one_positive_cell_per_source_with_sub_cell_offsets():
    heat, reg, pos = targets(*_sources(), SHAPE, SCENE, STEP, 1.0)
    assert pos.sum() == 3 and float(heat.max()) == 1.0 and float(heat.min()) >= 0.0
    offs = reg.permute(0, 2, 3, 1)[pos]
    assert float(offs[:, :2].abs().max()) <= 0.5 and float(offs[:, 2].abs().max()) <= 1.0


def test_decode_recovers_positions_and_k_from_a_synthetic_heatmap():
    phi, theta, r, mask = _sources()
    x, score, k = decode(_perfect_output(phi, theta, r, mask), 0.5, 5, SCENE, STEP)
    assert int(k[0]) == 3
    got = sorted(x[0, :3].tolist())
    want = sorted(torch.stack([phi[0, :3], theta[0, :3], r[0, :3].log()], -1).tolist())
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)  # float32 offsets: exact to ~1e-7 of a cell
    assert torch.all(score[0, :3] > 0.99) and torch.all(score[0, 3:] < 0.01)


def test_decode_keeps_at_least_one_source_and_at_most_k_max():
    flat = torch.full((2, 4, *SHAPE), -10.0)
    x, _, k = decode(flat, 0.5, 5, SCENE, STEP)
    assert k.tolist() == [1, 1] and x.shape == (2, 5, 3)
    many = flat.clone()
    many[:, 0, ::4, ::4] = 10.0  # 66 isolated peaks
    assert decode(many, 0.5, 5, SCENE, STEP)[2].tolist() == [5, 5]


def test_loss_is_invariant_to_the_order_of_sources_and_small_for_the_perfect_output():
    phi, theta, r, mask = _sources()
    out = _perfect_output(phi, theta, r, mask)
    perm = torch.tensor([2, 0, 1, 3, 4])
    a = detector_loss(out, *targets(phi, theta, r, mask, SHAPE, SCENE, STEP, 1.0))
    b = detector_loss(out, *targets(phi[:, perm], theta[:, perm], r[:, perm], mask[:, perm], SHAPE, SCENE, STEP, 1.0))
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert float(a["reg"]) < 1e-6 and float(a["heat"]) < 1e-2


def test_network_shapes_and_translation_equivariance_of_the_heat():
    net = HeatNet(8, 8).eval()
    x = torch.randn(2, 8, *SHAPE)
    with torch.no_grad():
        out, shifted = net(x), net(torch.roll(x, 3, dims=-2))
    assert out.shape == (2, 4, *SHAPE) and torch.isfinite(out).all()
    assert float(out[:, 1:3].abs().max()) <= 0.5 and float(out[:, 3].abs().max()) <= 1.0
    # receptive field radius 8 cells: away from the edges and the roll's seam a shift of the map shifts the output
    torch.testing.assert_close(shifted[..., 12:-12, :], torch.roll(out, 3, dims=-2)[..., 12:-12, :])


def test_log_map_is_finite_for_a_zero_cell():
    assert torch.isfinite(log_map(torch.tensor([0.0, 1.0, 2.0]))).all()


TINY = DetectorConfig(train_seeds=(1,), snapshots=(16,), scenes_per_epoch=40, epochs=1, batch=20, n_val=20, width=4)


def test_training_is_deterministic_and_the_checkpoint_loads(tmp_path):
    from ris_model.detector_infer import DETECTOR_REFINED, load_detector
    from ris_model.detector_train import train_detector
    from ris_model.simulate import make_system, simulate

    cfg = RunConfig()
    a = torch.load(train_detector(cfg, TINY, tmp_path / "a.pt"), weights_only=False)
    b = torch.load(train_detector(cfg, TINY, tmp_path / "b.pt"), weights_only=False)
    assert a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert a["pipeline"] == b["pipeline"] and not (tmp_path / "a.partial.pt").exists()
    det, tag = load_detector(tmp_path / "a.pt", cfg, lm_iters=1)
    data = simulate(cfg, make_system(cfg), "test", [0, 1])
    est, k, seconds = det(data)[DETECTOR_REFINED]
    assert est.phi.shape == (2, cfg.scene.k_max) and bool((est.k == k).all()) and seconds > 0 and len(tag) > 12
    assert math.isfinite(float(est.r[est.mask].sum()))


def test_loading_another_checkpoint_format_says_what_it_is(tmp_path):
    from ris_model.detector_infer import DetectorError, load_detector

    torch.save({"format": 99}, tmp_path / "x.pt")
    with pytest.raises(DetectorError, match="traindet"):
        load_detector(tmp_path / "x.pt", RunConfig())
    assert dataclasses.asdict(TINY)["snapshots"] == (16,)
