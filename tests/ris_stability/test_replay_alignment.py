"""Robust replay and alignment: a float64 replay that fails is a verdict, not a traceback, and the float32
finding stays; check_alignment pairs matrices per sample across batch dims and accepts declared transforms."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ris_stability.instruments.alignment import check_alignment, sample_difference
from ris_stability.replay.bisect import bisect_capsule
from ris_stability.records.capsule import Capsule, capture_rng

REPLAYER = f"{__name__}:replayer"


class CastsToFloat32(nn.Module):
    """Casts its input to float32 itself: rebuilt in float64 its float64 weight meets a float32 tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return torch.sqrt(self.lin(x.float()).pow(2).sum(-1)).mean()  # a zero row: sqrt backward at 0


def replayer(capsule: Capsule, dtype: str | None):
    model = CastsToFloat32()
    model.load_state_dict(capsule.model_state)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    x = capsule.batch["x"]
    return SimpleNamespace(model=model, roots={"model": model}, loss=lambda: model(x))


def test_failing_float64_replay_is_a_verdict_and_keeps_the_finding(tmp_path):
    torch.manual_seed(0)
    model = CastsToFloat32()
    with torch.no_grad():
        model.lin.weight[:] = 0.0
        model.lin.bias[:] = 0.0  # every output row is zero
    x = torch.randn(4, 3)
    loss = model(x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    cap = Capsule(step=3, batch={"x": x}, model_state={k: v.clone() for k, v in model.state_dict().items()},
                  optimizer_state=None, rng=capture_rng(), grads=grads,
                  meta={"replayer": REPLAYER, "loss": float(loss), "grads_finite": False})
    result = bisect_capsule(cap.save(tmp_path / "step_000003.pt"), float64=True)
    assert result.finding is not None and "sqrt backward at 0" in result.finding.cause
    assert result.float64["verdict"] == "float64 replay failed"
    assert result.float64["explanation"].startswith("float64 replay failed: RuntimeError")
    assert "float32 finding stands" in result.float64["explanation"]


def _cov(x):
    return x.mT @ x / x.shape[-2]


def test_sample_difference_pairs_batches():
    a = torch.randn(3, 4, 4, dtype=torch.float64)
    assert sample_difference(a[:1], a[0]) == 0.0  # (1, N, N) against (N, N)
    assert sample_difference(a, a[2]) == 0.0  # one inference sample against the closest training sample
    assert sample_difference(a, a + 1) > 0 and sample_difference(a[:2], a) is None
    assert sample_difference(a, a[..., :3, :3]) is None


def test_alignment_across_batch_dims_and_declared_transform():
    torch.manual_seed(0)
    x = torch.randn(16, 4, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)

    def train(b):  # training sees a batch of one
        return torch.linalg.eigvalsh(_cov(b)[None]).sum()

    def infer_plain(b):
        return torch.linalg.eigh(_cov(b))

    def infer_loaded(b):  # inference adds diagonal loading
        return torch.linalg.eigh(_cov(b) + 1e-3 * eye)

    plain = check_alignment(train, infer_plain, x)
    assert plain.rows and all(r.aligned for r in plain.rows) and plain.rows[0].rel_diff == 0.0
    loaded = check_alignment(train, infer_loaded, x)
    assert not all(r.aligned for r in loaded.rows)
    declared = check_alignment(train, infer_loaded, x, transforms={"+ 1e-3 I": lambda r: r + 1e-3 * eye})
    row = declared.rows[0]
    assert row.aligned and row.consumes.endswith("+ 1e-3 I") and row.rel_diff == pytest.approx(0.0, abs=1e-15)
