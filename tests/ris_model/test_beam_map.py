"""The whitened Bartlett map of the learned detector (``beam_map``) against its definition."""

from __future__ import annotations

import torch

from ris_model.beam_map import CHUNK_SCENES, SPLIT_SCENES, BeamMap
from ris_model.config import RunConfig
from ris_model.simulate import make_system, simulate


def test_flat_map_is_the_sum_over_snapshots_of_the_captured_energy():
    cfg = RunConfig()
    system = make_system(cfg)
    bmap = BeamMap(system, cfg.scene, 3.0, 8)
    d = simulate(cfg, system, "test", list(range(CHUNK_SCENES + 3)))  # two blocks, the second partial
    yw = (bmap.w @ d["y"].to(torch.complex128)[..., None])[..., 0]  # (B, L, M)
    ref = torch.einsum("lmg,blm->blg", bmap.dictionary.cols_h.to(torch.complex128), yw).abs().square().sum(1)
    got = bmap.flat(d["y"])
    assert got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.max()))
    few = bmap.flat(d["y"][:SPLIT_SCENES - 1])  # fewer scenes: one block of all cells
    torch.testing.assert_close(few.double(), ref[:SPLIT_SCENES - 1], rtol=1e-5, atol=1e-6 * float(ref.max()))
    img = bmap.image(d["y"])
    assert img.shape == (len(d["k"]), 8, *bmap.shape[:2])
    torch.testing.assert_close(img.mean((1, 2, 3)), torch.ones(len(d["k"])), rtol=1e-5, atol=0.0)


def test_whiten_applies_each_snapshot_s_whitener():
    cfg = RunConfig()
    system = make_system(cfg)
    bmap = BeamMap(system, cfg.scene, 3.0, 8)
    y = simulate(cfg, system, "test", list(range(3)))["y"]
    got = bmap.whiten(y)
    for b in range(3):
        for l in range(y.shape[1]):
            torch.testing.assert_close(got[b, l], bmap.w[0, l] @ y[b, l].to(torch.complex128), rtol=1e-12, atol=1e-14)


def test_channels_last_image_is_the_map_s_own_layout_without_a_copy():
    cfg = RunConfig()
    system = make_system(cfg)
    bmap = BeamMap(system, cfg.scene, 3.0, 8)
    y = simulate(cfg, system, "test", list(range(3)))["y"]
    img, cl = bmap.image(y), bmap.image(y, torch.channels_last)
    assert img.is_contiguous() and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, img)
    p, t, r = bmap.shape
    flat = cl.permute(0, 2, 3, 1).reshape(3, p * t * r)  # cells phi-major, range innermost: the flat map's order
    assert flat.is_contiguous() and torch.equal(flat, bmap.flat(y) / bmap.flat(y).mean(-1, keepdim=True))
