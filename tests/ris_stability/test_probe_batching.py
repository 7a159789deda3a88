"""Per-sample loops: the probe measures the many small calls of one site together, with the same
records as measuring them one by one."""
from __future__ import annotations

import math

import pytest
import torch

from ris_stability.instruments.probe import SpectralProbe


def per_sample_loop(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    total = A.new_zeros(())
    for i in range(A.shape[0]):
        H = A[i] @ A[i].mT + torch.eye(A.shape[-1])
        w, V = torch.linalg.eig(H)
        total = total + (V.abs() ** 2)[:, :2].sum() + w.real.sum()
        total = total + torch.linalg.eigh(H)[1][:, -2:].square().sum()
        total = total + torch.linalg.svdvals(A[i]).sum() + torch.linalg.pinv(A[i]).sum()
        total = total + torch.linalg.solve(H, B[i]).sum() + torch.linalg.eigvals(A[i]).real.sum()
    return total


def _records(batch_calls: bool, n_samples: int) -> dict:
    torch.manual_seed(0)
    A = torch.randn(n_samples, 5, 5, requires_grad=True)
    B = torch.randn(n_samples, 5, 2)
    with SpectralProbe(roots={}, batch_calls=batch_calls, max_matrices=None) as probe:
        per_sample_loop(A, B).backward()
        return probe.collect()


@pytest.mark.parametrize("n_samples", [3, 40], ids=["few-calls", "more-than-a-flush"])
def test_batched_records_equal_per_call_records(n_samples):
    batched, single = _records(True, n_samples), _records(False, n_samples)
    assert batched.keys() == single.keys() and len(batched) == 6
    for name, rec in batched.items():
        other = single[name]
        assert rec["calls"] == other["calls"] == n_samples and rec["vec_grad"] == other["vec_grad"]
        for key, value in rec["stats"].items():
            if key == "herm_err":  # sampled by design (site_stats.HERM_SAMPLE per batch): never above the whole
                assert not value > other["stats"][key] * (1 + 1e-9) + 1e-12, (name, key)
                continue
            assert value == pytest.approx(other["stats"][key], rel=1e-9, abs=1e-12, nan_ok=True), (name, key)
    assert math.isfinite(batched["linalg.eig"]["stats"]["rel_sep"])
    assert math.isfinite(batched["linalg.pinv"]["stats"]["cutoff_margin"])
