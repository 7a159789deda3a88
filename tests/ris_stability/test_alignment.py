"""check_alignment on a toy pipeline (no ris_model): a planted misalignment is found and named, the
aligned variants pass, data matrices are left out, and the capture leaves nothing behind."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from ris_stability.instruments.alignment import (
    AlignmentError, MatrixCapture, check_alignment, default_rtol, numerical_rank, relative_difference,
)

N, R, B = 12, 3, 4


@dataclass(frozen=True)
class ToyBatch:
    x: torch.Tensor  # (B, 8) inputs
    S: torch.Tensor  # (B, N, N) a data covariance, trace 1, rank 2
    target: torch.Tensor  # (B, N, N) the target covariance


def toy_batch(dtype=torch.complex64) -> ToyBatch:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, N, 2, dtype=torch.complex128, generator=g)
    s = s @ s.mH
    t = torch.randn(B, N, R, dtype=torch.complex128, generator=g)
    t = t @ t.mH
    norm = lambda m: m / torch.diagonal(m, dim1=-2, dim2=-1).real.sum(-1)[:, None, None]  # noqa: E731
    return ToyBatch(torch.randn(B, 8, generator=g), norm(s).to(dtype), norm(t).to(dtype))


class Factors(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, 2 * N * R)

    def forward(self, x):
        f = self.head(x).view(-1, N, R, 2)
        return torch.complex(f[..., 0], f[..., 1])


def build(f, S):
    """The toy builder: R_pred = F F^H / tr, R_blend = 0.7 R_pred + 0.3 S."""
    pred = f @ f.mH
    pred = pred / torch.diagonal(pred, dim1=-2, dim2=-1).real.sum(-1)[:, None, None]
    return pred, 0.7 * pred + 0.3 * S


class NMSE(nn.Module):  # no linear algebra: captured as a consumer module
    def forward(self, r_x, target):
        return ((r_x - target).abs() ** 2).sum((-2, -1)).mean()


class TopEnergy(nn.Module):  # eigh on the matrix: captured as a linalg input
    def forward(self, r_x):
        vals, vecs = torch.linalg.eigh(r_x)
        return -vals[..., -1].mean() + 0 * vecs.abs().sum()


class ToyLoss(nn.Module):
    def __init__(self, use: str):
        super().__init__()
        self.use, self.nmse, self.top = use, NMSE(), TopEnergy()
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, f, batch):
        pred, blend = build(f, batch.S)
        self.last = {"R_pred": pred, "R_blend": blend}
        r_x = pred if self.use == "pred" else blend
        return self.nmse(r_x, batch.target) + self.top(r_x)


def pipeline(use: str, infer_dtype=None, perturb: float = 0.0):
    model, loss = Factors().eval(), ToyLoss(use)

    def train_fn(batch):
        return loss(model(batch.x), batch)

    def infer_fn(batch):
        with torch.no_grad():
            _, blend = build(model(batch.x), batch.S)
            blend = blend if infer_dtype is None else blend.to(infer_dtype)
            return torch.linalg.eigh(blend * (1 + perturb) if perturb else blend)

    kwargs = dict(roots={"model": model, "loss": loss}, consumers={"loss.nmse": loss.nmse, "loss.top": loss.top},
                  names=lambda: loss.last)
    return train_fn, infer_fn, kwargs


def test_planted_misalignment_is_found_and_named():
    train_fn, infer_fn, kw = pipeline("pred")
    result = check_alignment(train_fn, infer_fn, toy_batch(), **kw)
    assert not result.aligned
    rows = {row.consumer: row for row in result.rows}
    assert set(rows) == {"loss.nmse", "loss.top"}  # the target (batch data) is not compared
    for row in rows.values():
        assert not row.aligned and row.consumes == "R_pred" and row.inference_consumes == "R_blend"
        assert row.rel_diff > 0.1 and row.rank == R and row.inference_rank == R + 2
    assert rows["loss.top"].via == "linalg.eigh" and rows["loss.nmse"].via == "sub"
    table = result.format_table()
    assert "MISALIGNED" in table and "loss.nmse" in table and "R_pred" in table and "R_blend" in table
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["aligned"] is False and {r["consumes"] for r in doc["rows"]} == {"R_pred"}


@pytest.mark.parametrize("infer_dtype", [None, torch.complex128], ids=["same dtype", "inference upcasts"])
def test_aligned_pipeline_passes(infer_dtype):
    train_fn, infer_fn, kw = pipeline("blend", infer_dtype)
    result = check_alignment(train_fn, infer_fn, toy_batch(), **kw)
    assert result.aligned, result.format_table()
    assert {row.consumes for row in result.rows} == {"R_blend"}
    assert all(row.rel_diff == 0.0 for row in result.rows)  # eval mode, same inputs: bit-identical
    assert "verdict: ALIGNED" in result.format_table()


def test_same_object_is_aligned_without_comparison():
    model, loss = Factors().eval(), ToyLoss("blend")
    batch = toy_batch()
    result = check_alignment(lambda b: loss(model(b.x), b), lambda b: torch.linalg.eigh(loss.last["R_blend"]), batch,
                             consumers={"loss.top": loss.top}, names=lambda: loss.last)
    assert result.aligned and all(row.same_object for row in result.rows)


@pytest.mark.parametrize("factor, aligned", [(0.1, True), (10.0, False)], ids=["below rtol", "above rtol"])
def test_tolerance_is_n_eps_of_the_dtype(factor, aligned):
    rtol = default_rtol(N, torch.complex64)
    assert rtol == pytest.approx(N * torch.finfo(torch.float32).eps)
    # Perturb in complex128 so the relative change survives exactly; the loss side stays complex64.
    train_fn, infer_fn, kw = pipeline("blend", torch.complex128, perturb=factor * rtol)
    result = check_alignment(train_fn, infer_fn, toy_batch(), **kw)
    assert result.aligned is aligned
    assert all(row.rel_diff == pytest.approx(factor * rtol, rel=1e-3) for row in result.rows)


def test_several_training_paths_share_one_inference_run():
    train_fn, infer_fn, kw = pipeline("blend")
    _, _, kw_pred = pipeline("pred")
    model, bad = Factors().eval(), ToyLoss("pred")
    result = check_alignment({"train": train_fn, "val": lambda b: bad(model(b.x), b)}, infer_fn, toy_batch(),
                             **{**kw, "consumers": {**kw["consumers"], "val.top": bad.top}})
    by_phase = {(row.phase, row.consumer): row.aligned for row in result.rows}
    assert by_phase[("train", "loss.top")] and not by_phase[("val", "val.top")]
    assert not result.aligned


def test_nothing_to_compare_raises():
    train_fn, _, kw = pipeline("blend")
    with pytest.raises(AlignmentError, match="fed no square matrix to linear algebra"):
        check_alignment(train_fn, lambda b: None, toy_batch(), **kw)
    with pytest.raises(AlignmentError, match="no matrix the training path consumes has the shape"):
        check_alignment(lambda b: b.x.sum(), lambda b: torch.linalg.eigh(b.S), toy_batch())


def test_capture_does_not_disturb_and_leaves_nothing_behind():
    model, loss = Factors().eval(), ToyLoss("blend")
    batch = toy_batch()
    plain = loss(model(batch.x), batch)
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with MatrixCapture({"loss": loss}, {"loss.nmse": loss.nmse}) as cap:
        captured = loss(model(batch.x), batch)
    captured.backward()
    assert torch.equal(plain, captured)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert {rec.consumer for rec in cap.records} == {"loss.nmse", "loss.top"}
    n = len(cap.records)
    loss(model(batch.x), batch)  # after exit: no mode, no hooks
    assert len(cap.records) == n and not torch.overrides._is_torch_function_mode_enabled()


def test_rank_and_difference_helpers():
    b = toy_batch(torch.complex128)
    assert numerical_rank(b.S) == 2 and numerical_rank(b.target) == R
    assert relative_difference(b.S, b.S) == 0.0
    assert relative_difference(2 * b.S, b.S) == pytest.approx(1.0)


def _marked_eigh(A):
    """A custom eigh that dispatches through __torch_function__ and declares itself spectral."""
    if torch.overrides.has_torch_function((A,)):
        return torch.overrides.handle_torch_function(_marked_eigh, (A,), A)
    return torch.linalg.eigh(A)


_marked_eigh.__spectral_op__ = "eigh"


def test_functions_marked_spectral_are_linalg_inputs():
    batch = toy_batch()
    with MatrixCapture() as cap:
        _marked_eigh(batch.S)
    assert [rec.via for rec in cap.records] == ["_marked_eigh"]
    assert cap.records[0].consumer.split(":")[0].endswith("test_alignment.py")  # no module: the source line
    assert cap.records[0].tensor is batch.S
