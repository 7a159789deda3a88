"""Benchmark conditions: independent scenes per condition, SNR pinned, unknown SNR refused."""

from __future__ import annotations

import pytest
import torch

from ris_model.benchmark import BenchmarkError, condition_data
from ris_model.config import RunConfig
from ris_model.simulate import make_system


def test_conditions_draw_their_own_scenes_symbols_and_noise():
    cfg = RunConfig()
    system = make_system(cfg)
    a = condition_data(cfg, system, "test", 10.0, 4)
    b = condition_data(cfg, system, "test", 20.0, 4)
    assert torch.all(a["snr_db"] == 10.0) and torch.all(b["snr_db"] == 20.0)
    assert not torch.equal(a["phi"], b["phi"])  # other positions, not the same scenes with less noise
    assert not set(a["index"].tolist()) & set(b["index"].tolist())


def test_unknown_snr_is_refused():
    cfg = RunConfig()
    with pytest.raises(BenchmarkError, match="no scene block"):
        condition_data(cfg, make_system(cfg), "test", 12.5, 2)
