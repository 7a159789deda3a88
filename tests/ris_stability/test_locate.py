"""Locator: clean runs, usage errors, no state left behind, and the Finding record."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from ris_stability import Finding, Locator, locate_nonfinite
from ris_stability.locate import LocatorUsageError
from ris_stability.locate.finding import TensorSummary, format_finding
from tests.ris_stability.locate_toys import Loss, Net, SqrtNorm, Whitener, low_rank_psd


# --- clean runs, usage, state -----------------------------------------------------------------------
def test_finite_run_returns_none_and_leaves_grads_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(5, 4)
    expected = model(x).pow(2).mean()
    assert locate_nonfinite(lambda m, x: m(x).pow(2).mean(), model, x) is None
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(x).pow(2).mean(), expected)


def test_non_scalar_loss_is_a_usage_error():
    with pytest.raises(LocatorUsageError, match=r"shape \(3,\)"):
        locate_nonfinite(lambda x: x * 2, torch.ones(3))
    with pytest.raises(LocatorUsageError, match="returned dict"):
        locate_nonfinite(lambda x: {"loss": x.sum()}, torch.ones(3))


def test_closure_modules_name_the_paths():
    net = Net()

    def step(x):
        return net(x)

    assert locate_nonfinite(step, torch.zeros(3)).module == "net.head"


def _global_state():
    from torch.nn.modules import module as M
    return (torch._C._len_torch_function_stack(), torch._C._len_torch_dispatch_stack(),
            torch.is_anomaly_enabled(), len(M._global_forward_pre_hooks), len(M._global_forward_hooks),
            list(warnings.filters))


def test_no_mode_hook_or_anomaly_state_is_left_behind():
    before = _global_state()
    locate_nonfinite(Net(), torch.zeros(3))
    locate_nonfinite(SqrtNorm(), torch.zeros(2, 2, requires_grad=True))
    locate_nonfinite(Whitener(), -torch.eye(2))
    with pytest.raises(LocatorUsageError):
        locate_nonfinite(lambda x: x, torch.ones(2))

    def interrupted(x):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        locate_nonfinite(interrupted, torch.ones(2))
    assert _global_state() == before


def test_user_warnings_still_reach_the_caller():
    def loss(x):
        warnings.warn("from the user's code", UserWarning)
        return x.sum()

    with pytest.warns(UserWarning, match="from the user's code"):
        assert locate_nonfinite(loss, torch.ones(2)) is None


# --- Finding: JSON and text -------------------------------------------------------------------------
def test_finding_round_trips_through_json():
    B = low_rank_psd(1, 12, 3).requires_grad_(True)
    f = Locator(roots={"loss": (loss := Loss(2))}).run(loss, B, torch.ones(12, 12))
    text = json.dumps(f.to_dict(), allow_nan=False)
    back = Finding.from_dict(json.loads(text))
    assert (back.phase, back.node, back.module, back.cause, back.remedies) == (
        f.phase, f.node, f.module, f.cause, f.remedies)
    assert back.inputs[-1].spectral["max_cluster"] == 9
    assert math.isnan(back.inputs[-1].spectral["amplification"])  # inf is written as null
    rendered = format_finding(f)
    assert "LinalgEighBackward0" in rendered and "loss.subspace" in rendered and "cluster of 9" in rendered


def test_finding_rejects_unknown_keys_and_phases():
    from ris_stability.locate.finding import FindingFormatError

    with pytest.raises(FindingFormatError, match="unknown key"):
        Finding.from_dict({"phase": "forward", "cause": "x", "colour": "red"})
    with pytest.raises(FindingFormatError, match="phase"):
        Finding(phase="sideways", cause="x")


def test_tensor_summary_counts():
    s = TensorSummary.of("t", torch.tensor([0.0, -2.0, math.nan, math.inf, 3.0]))
    assert (s.min, s.max, s.absmax, s.nan, s.inf, s.zeros) == (-2.0, 3.0, 3.0, 1, 1, 1)
    c = TensorSummary.of("z", torch.tensor([3 + 4j, 0j]))
    assert (c.max, c.zeros, c.dtype) == (5.0, 1, "complex64")
