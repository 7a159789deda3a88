"""The precision audit on an outside-style model: a learned Hermitian covariance whose phase-invariant
projector loss goes through torch.linalg.eig in complex64, per sample in a Python loop."""
from __future__ import annotations

import json

import pytest
import torch

from ris_stability import audit_precision
from ris_stability.records.capsule import Capsule, capture_rng
from ris_stability.cli import main
from ris_stability.instruments.precision import PrecisionAudit
from ris_stability.numerics.tolerances import PRECISION_GRAD_RTOL

from tests.ris_stability.eig_models import FactorNet, ProjectorLoss, eig_loss, eig_setup, make_batch

HIGH_SCALE = 1e10  # covariance eigenvalues ~1e11: the complex64 eig backward is rounding-dominated


def _flat_grads(net: FactorNet, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(net.parameters()))
    return torch.cat([g.reshape(-1).double() for g in grads])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def exploding() -> tuple[PrecisionAudit, FactorNet, ProjectorLoss, dict]:
    net, loss_fn = eig_setup()
    batch = make_batch(HIGH_SCALE)
    return audit_precision(eig_loss, net, loss_fn, batch), net, loss_fn, batch


def test_audit_names_the_eig_site_and_its_cause(exploding):
    audit = exploding[0]
    assert not audit.ok and audit.baseline_error > 100  # a 100x+ gradient error, not a subtle one
    assert audit.culprit == "loss_fn:linalg.eig"
    site = next(s for s in audit.sites if s.site == audit.culprit)
    assert site.calls == 4 and site.dtype == "complex64"  # one site for the per-sample loop
    assert site.promoted_error < PRECISION_GRAD_RTOL
    assert site.phase_noise > 10 * site.gap_terms and site.lambda_max > 1e10
    assert audit.cause.startswith("complex64 rounding in the eig backward: eigenvalues up to")
    assert "phase term noise" in audit.cause and "gap terms" in audit.cause
    assert any("complex128" in r for r in audit.remedies)
    assert any("torch.linalg.eigh" in r for r in audit.remedies)  # the covariance is Hermitian
    assert max(audit.parameters.values()) > 100


def test_complex128_remedy_is_within_one_percent_of_float64(exploding):
    _, net, _, batch = exploding
    ref_net = FactorNet().double()
    ref_net.load_state_dict(net.state_dict())
    high = {k: v.to(torch.complex128 if v.is_complex() else torch.float64) for k, v in batch.items()}
    reference = _flat_grads(ref_net, eig_loss(ref_net, ProjectorLoss(torch.complex128), high))
    complex64 = _flat_grads(net, eig_loss(net, ProjectorLoss(torch.complex64), batch))
    remedy = _flat_grads(net, eig_loss(net, ProjectorLoss(torch.complex128), batch))
    audit = exploding[0]
    assert audit.culprit == "loss_fn:linalg.eig"
    site = next(s for s in audit.sites if s.site == audit.culprit)
    # the audit's numbers are the ones a user gets by hand: the run's error, the reference, and the error left
    # when only the culprit eig runs in complex128 (its promotion computes that op, not the loss, in complex128)
    assert audit.baseline_error == pytest.approx(_rel(complex64, reference), rel=0.05) and audit.baseline_error > 100
    assert audit.reference_norm == pytest.approx(float(reference.norm()), rel=0.01)
    assert audit.grad_norm == pytest.approx(float(complex64.norm()), rel=0.05)
    assert site.promoted_error < 0.01 and _rel(remedy, reference) < 0.01
    assert site.promoted_error == pytest.approx(_rel(remedy, reference), abs=2e-3)


def test_healthy_scale_passes_the_audit():
    net, loss_fn = eig_setup()
    audit = audit_precision(eig_loss, net, loss_fn, make_batch(1.0))
    assert audit.ok and audit.culprit == "" and audit.baseline_error < 1e-4
    assert audit.remedies == ()


def test_audit_changes_nothing():
    net, loss_fn = eig_setup()
    batch = make_batch(HIGH_SCALE)
    before = capture_rng()["torch"]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    audit_precision(eig_loss, net, loss_fn, batch)
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def test_cli_bisect_precision_on_a_capsule(tmp_path, capsys):
    net, _ = eig_setup()
    cap = Capsule(step=3, batch={"batch": make_batch(HIGH_SCALE)}, model_state=net.state_dict(),
                  optimizer_state=None, rng=capture_rng(), reason="gradient spike",
                  meta={"replayer": "tests.ris_stability.eig_models:replay"})
    path = cap.save(tmp_path / "capsules" / "step_000003.pt")
    assert main(["bisect", "--precision", "--json", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["culprit"] == "loss:linalg.eig" and "phase term noise" in out["cause"]
