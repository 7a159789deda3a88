"""``with ris_stability.gap_aware():``: every spelling of torch's eigh/SVD gets the gap-aware backward inside,
forwards stay bit-identical, everything is restored on exit (also on an exception), contexts nest, and it
composes with the probe and the locator. Outside-style models: a whitening layer via eigh, an SVD layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ris_stability
from ris_stability import SpectralProbe, gap_aware, locate_nonfinite
from ris_stability.spectral import eigh_gap_aware, is_active, svd_gap_aware, svd_old_gap_aware

SPELLINGS = [(torch.linalg, "eigh"), (torch.linalg, "svd"), (torch, "svd"), (torch.Tensor, "svd")]


def _originals():
    return [getattr(owner, name) for owner, name in SPELLINGS]


TORCH_FUNCTIONS = _originals()  # as imported, before any context: what every exit must restore


class Whitening(nn.Module):
    """An outside codebase's whitening layer: eigh of a loaded covariance (loading ties the null space)."""

    def __init__(self, d: int = 6, rank: int = 2):
        super().__init__()
        self.proj = nn.Linear(d, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)  # (B, rank)
        cov = z.mT @ z / x.shape[0]
        cov = torch.block_diag(cov, torch.zeros(4, 4)) + 1e-3 * torch.eye(6)  # 4 exactly tied eigenvalues
        lam, vec = torch.linalg.eigh(cov)
        top = vec[:, -2:]
        return (top @ top.mT).square().sum() + lam.sum()


class SvdLayer(nn.Module):
    """Projection onto the top-2 left singular vectors of a rank-deficient feature matrix (Tensor.svd)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.zeros(6, 6)
        f[:3, :3] = self.lin(x)  # rank 3 of 6: three exact zero singular values
        u, _, _ = f.svd()
        return (u[:, :2] @ u[:, :2].mT * torch.arange(36.0).view(6, 6)).sum()


def _grads(model: nn.Module, x: torch.Tensor, wrap: bool):
    model.zero_grad(set_to_none=True)
    if wrap:
        with gap_aware():
            loss = model(x)
    else:
        loss = model(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("model_cls", [Whitening, SvdLayer])
def test_outside_models_nan_without_and_finite_with_the_one_line(model_cls):
    torch.manual_seed(0)
    model, x = model_cls(), torch.randn(8, 6) if model_cls is Whitening else torch.randn(3, 3)
    loss_off, grads_off = _grads(model, x, wrap=False)
    loss_on, grads_on = _grads(model, x, wrap=True)
    assert torch.equal(loss_off, loss_on)  # forward bit-identical
    assert any(torch.isnan(g).any() for g in grads_off)
    assert all(torch.isfinite(g).all() for g in grads_on)
    assert _originals() == TORCH_FUNCTIONS


def test_every_spelling_is_swapped_inside_and_restored_after():
    before = _originals()
    with gap_aware():
        assert is_active()
        assert _originals() == [eigh_gap_aware, svd_gap_aware, svd_old_gap_aware, svd_old_gap_aware]
        a = torch.randn(2, 5, 5, dtype=torch.complex128, requires_grad=True)
        h = a + a.mH
        assert torch.linalg.eigh(h).eigenvectors.grad_fn.name() == "EighGapAwareBackward"
        assert torch.linalg.svd(a).U.grad_fn.name() == "SvdGapAwareBackward"
        assert torch.svd(a).V.grad_fn is not None and a.svd().U.grad_fn.name() == "SvdGapAwareBackward"
    assert not is_active() and _originals() == before
    assert "svd" not in vars(torch.Tensor)  # the method is inherited again, not shadowed by a copy


def test_restored_on_exception_and_nestable():
    before = _originals()
    with pytest.raises(KeyError):
        with gap_aware():
            with gap_aware():
                assert torch.linalg.eigh is eigh_gap_aware
            assert torch.linalg.eigh is eigh_gap_aware  # the inner exit leaves the outer active
            raise KeyError("boom")
    assert _originals() == before and not is_active()


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.float64, torch.complex128], ids=str)
def test_forwards_bit_identical_in_every_spelling(dtype):
    a = torch.randn(3, 6, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
    h = a @ a.mH
    calls = [lambda: torch.linalg.eigh(h), lambda: torch.linalg.eigh(h, UPLO="U"), lambda: torch.linalg.svd(a),
             lambda: torch.linalg.svd(a, full_matrices=False), lambda: torch.svd(a), lambda: a.svd(some=False)]
    off = [call() for call in calls]
    with gap_aware():
        on = [call() for call in calls]
    for x, y in zip(off, on):
        assert type(x) is type(y) and all(torch.equal(p, q) for p, q in zip(x, y))


def test_backward_outside_the_context_still_gap_aware():
    a = torch.zeros(4, 4, dtype=torch.float64)
    a[:2, :2] = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    a.requires_grad_()
    with gap_aware():
        u = torch.linalg.svd(a).U
    (u[:, :1] @ u[:, :1].mT).sum().backward()  # the graph was built inside: its backward is gap-aware
    assert torch.isfinite(a.grad).all()


def test_composes_with_the_probe_and_the_locator():
    torch.manual_seed(0)
    model, x = Whitening(), torch.randn(8, 6)
    with SpectralProbe(roots={"model": model}) as probe, gap_aware():
        loss = model(x)
        loss.backward()
    records = probe.collect()
    (site,) = records
    assert site == "model:eigh_gap_aware" and records[site]["stats"]["max_cluster"] == 4
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with gap_aware(), SpectralProbe(roots={"model": model}) as probe:  # the other order of entry
        model(x).backward()
    assert probe.collect()[site.replace("eigh_gap_aware", "linalg.eigh")]["stats"]["max_cluster"] == 4
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert _originals() == TORCH_FUNCTIONS
    assert locate_nonfinite(model, x) is not None  # torch's backward: NaN, located
    with gap_aware():
        assert locate_nonfinite(model, x) is None  # gap-aware: clean
    assert ris_stability.gap_aware is gap_aware


@pytest.mark.parametrize("script", ["eigh_whiten.py", "svd_polar.py"])
def test_trace_gap_aware_runs_the_planted_fault_scripts_clean(tmp_path, script):
    """The same unmodified scripts that go NaN at their fault step under `risdiag trace -- python` (see
    test_script_trace.py) run clean with --gap-aware: their losses are invariant inside the tied clusters."""
    from pathlib import Path

    from ris_stability import cli
    from ris_stability.records import read_trace

    script_path = Path(__file__).parent / "scripts" / script
    run_dir = tmp_path / "run"
    code = cli.main(["trace", "--gap-aware", "--out", str(run_dir), "--no-report", "--no-live", "--", "python",
                     str(script_path), "--steps", "8"])
    assert code == cli.EXIT_OK
    assert read_trace(run_dir).nonfinite_steps == []
    assert _originals() == TORCH_FUNCTIONS
