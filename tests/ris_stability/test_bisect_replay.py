"""Capsule replay on an outside-style model: bit-exact means loss, every gradient (NaN positions included)
and the non-finite pattern; the process thread count is restored afterwards."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ris_stability.replay.bisect import bisect_capsule, replay, same_bits
from ris_stability.records.capsule import Capsule, capture_rng

REPLAYER = f"{__name__}:replayer"


class RowNorms(nn.Module):
    """Mean Euclidean norm of the rows of a linear map's output. An all-zero input row gives a zero norm,
    whose sqrt backward is 0 * inf = NaN in every weight gradient: finite loss, NaN gradients, exactly,
    on any BLAS. The head's gradients stay finite."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4, bias=False)
        self.head = nn.Linear(1, 1)

    def forward(self, x):
        return self.head(torch.sqrt((self.lin(x) ** 2).sum(-1, keepdim=True))).mean()


def replayer(capsule: Capsule, dtype: str | None):
    model = RowNorms()
    model.load_state_dict(capsule.model_state)
    x = capsule.batch["x"]
    if dtype is not None:
        model, x = model.to(getattr(torch, dtype)), x.to(getattr(torch, dtype))
    return SimpleNamespace(model=model, roots={"model": model}, loss=lambda: model(x))


def make_capsule(zero_row: bool = True, threads: int | None = None) -> Capsule:
    torch.manual_seed(0)
    model = RowNorms()
    x = torch.randn(5, 3)
    if zero_row:
        x[2] = 0.0
    loss = model(x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    finite = all(bool(g.isfinite().all()) for g in grads.values())
    meta = {"replayer": REPLAYER, "loss": float(loss.detach()), "grads_finite": finite}
    if threads is not None:
        meta["threads"] = threads
    return Capsule(step=7, batch={"x": x}, model_state={k: v.clone() for k, v in model.state_dict().items()},
                   optimizer_state=None, rng=capture_rng(), meta=meta, grads=grads)


def test_planted_fault_is_nan_in_some_gradients_only():
    cap = make_capsule()
    assert math.isfinite(cap.meta["loss"]) and not cap.meta["grads_finite"]
    assert cap.grads["lin.weight"].isnan().all() and cap.grads["head.bias"].isfinite().all()


def test_identical_replay_is_bit_exact():
    outcome = replay(make_capsule())
    assert outcome.nonfinite and outcome.bad_parameters == ["lin.weight"]
    assert outcome.differences == [] and outcome.bit_exact


def nudged(t: torch.Tensor) -> torch.Tensor:
    """t with its first finite element moved by one ulp."""
    out = t.clone().reshape(-1)
    i = int(out.isfinite().nonzero()[0])
    out[i] = torch.nextafter(out[i], torch.tensor(math.inf))
    return out.reshape(t.shape)


@pytest.mark.parametrize("change, expected", [
    ("one_ulp_in_a_gradient", "gradient of head.bias differs"),
    ("nan_moved", "gradient of head.bias differs"),
    ("gradient_missing", "gradient of head.bias not recorded"),
    ("loss_one_ulp", "loss"),
    ("finite_flag", "gradients non-finite vs recorded finite"),
    ("no_gradients_stored", "stores no gradients"),
])
def test_replay_that_differs_is_not_bit_exact(change, expected):
    cap = make_capsule()
    if change == "one_ulp_in_a_gradient":
        cap.grads["head.bias"] = nudged(cap.grads["head.bias"])
    elif change == "nan_moved":
        cap.grads["head.bias"] = torch.full_like(cap.grads["head.bias"], math.nan)
    elif change == "gradient_missing":
        del cap.grads["head.bias"]
    elif change == "loss_one_ulp":
        cap.meta["loss"] = math.nextafter(cap.meta["loss"], math.inf)
    elif change == "finite_flag":
        cap.meta["grads_finite"] = True
    else:
        cap.grads = None
    outcome = replay(cap)
    assert not outcome.bit_exact
    assert any(expected in d for d in outcome.differences), outcome.differences


def test_same_bits_tells_values_nan_positions_and_signed_zero_apart():
    a = torch.tensor([1.0, math.nan, 0.0, math.inf])
    assert same_bits(a, a.clone())
    assert not same_bits(a, torch.tensor([1.0, 0.0, math.nan, math.inf]))
    assert not same_bits(a, torch.tensor([1.0, math.nan, -0.0, math.inf]))
    assert not same_bits(a, torch.tensor([1.0, math.nan, 0.0, -math.inf]))
    assert not same_bits(a, a.double())
    z = torch.tensor([1 + 2j, complex(math.nan, 0)])
    assert same_bits(z, z.clone()) and not same_bits(z, torch.tensor([1 + 2j, complex(0, math.nan)]))


def test_replay_and_bisect_restore_the_thread_count(tmp_path):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    try:
        result = bisect_capsule(make_capsule(threads=other).save(tmp_path / "step_000007.pt"), float64=True)
        assert torch.get_num_threads() == before
        assert result.outcome.bit_exact and result.finding is not None
        assert (result.finding.phase, result.finding.op) == ("backward", "aten.sqrt") or \
            result.finding.node.startswith("Sqrt")
        assert result.float64["verdict"] == "structural"  # a zero row is zero in float64 too
    finally:
        torch.set_num_threads(before)
