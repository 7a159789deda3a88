"""The learned initialiser: permutation-invariant slot loss, unit coordinates, a tiny end-to-end run."""

from __future__ import annotations

import pytest
import torch

from ris_model.config import RunConfig
from ris_model.learned_init import from_unit, slot_loss, to_unit


def test_slot_loss_is_invariant_to_the_order_of_sources_and_slots():
    g = torch.Generator().manual_seed(0)
    slots = torch.rand(3, 5, 3, generator=g) * 2 - 1
    logits = torch.randn(3, 5, generator=g)
    target = torch.rand(3, 5, 3, generator=g) * 2 - 1
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    ref = slot_loss(slots, logits, target, mask)
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert torch.allclose(slot_loss(slots[:, perm], logits[:, perm], target, mask), ref)
    swapped = target.clone()
    swapped[1] = target[1, [3, 1, 4, 0, 2]]
    assert torch.allclose(slot_loss(slots, logits, swapped, mask), ref)


def test_slot_loss_is_zero_in_position_for_exact_slots_and_penalises_wrong_ones():
    target = torch.tensor([[[0.1, -0.2, 0.3], [0.5, 0.5, -0.5], [0, 0, 0], [0, 0, 0], [0, 0, 0]]])
    mask = torch.tensor([[True, True, False, False, False]])
    confident = torch.tensor([[20.0, 20.0, -20.0, -20.0, -20.0]])
    slots = target.clone()
    slots[0, 2:] = 0.9
    assert float(slot_loss(slots, confident, target, mask)) < 1e-6
    moved = slots.clone()
    moved[0, 0, 0] += 0.3
    assert float(slot_loss(moved, confident, target, mask)) > 0.1  # Huber: 0.05 (0.3 - 0.025) / 0.05 / 2 sources


def test_unit_coordinates_round_trip():
    scene = RunConfig().scene
    x = torch.tensor([[[0.5, -0.2, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(from_unit(to_unit(x, scene), scene), x, rtol=0, atol=1e-6)
    assert float(to_unit(x, scene).abs().max()) <= 1.0


@pytest.mark.slow
def test_training_is_deterministic(tmp_path):
    """Two trainings with the same configs give bit-identical weights (the committed checkpoint's promise)."""
    from ris_model.learned_init import LocaliserConfig, train_localiser

    cfg = RunConfig()
    lcfg = LocaliserConfig(n_train=300, epochs=2, batch=100)
    a = torch.load(train_localiser(cfg, lcfg, tmp_path / "a.pt"), weights_only=False)["state"]
    b = torch.load(train_localiser(cfg, lcfg, tmp_path / "b.pt"), weights_only=False)["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
