"""The precision audit on the models a user brings: unused, frozen, shared and complex parameters, keyword arguments,
buffers, several sites in one module, ops that return tuples or take keyword matrices, and the reference run's
dtypes seen from outside it (instruments/precision.py, instruments/promote.py)."""
from __future__ import annotations

import inspect
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ris_stability import audit_precision
from ris_stability.instruments import precision, promote
from ris_stability.instruments.precision import PrecisionAuditError, format_audit
from ris_stability.instruments.promote import Float64Everything, SitePromotion, relative_error
from ris_stability.numerics.stats import hermitian_error
from ris_stability.numerics.tolerances import PRECISION_GRAD_RTOL

from tests.ris_stability.test_mut_precision import _Inv, _audit, _site

TOL = PRECISION_GRAD_RTOL
Y = torch.ones(4, 1)


def _line(fn, text: str) -> str:
    """``file:LINE`` of the line of ``fn`` that contains ``text`` (where the audit locates a site)."""
    lines, first = inspect.getsourcelines(fn)
    return f"{Path(__file__).name}:{first + next(k for k, ln in enumerate(lines) if text in ln)}"


def _locate_in(monkeypatch, fn) -> None:
    """Sites located at the running line of ``fn``: what caller_location gives in a plain run, but also in the
    mutation tree, whose trampoline frames caller_location would take for the user's code."""
    def locate() -> str:
        f = sys._getframe(1)
        while f.f_code is not fn.__code__:
            f = f.f_back
        return f"{Path(__file__).name}:{f.f_lineno}"
    monkeypatch.setattr(promote, "caller_location", locate)


def _grad(loss: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    g = torch.autograd.grad(loss, [p])[0]
    return g.to(torch.complex128 if g.is_complex() else torch.float64)


# -- the verdict ----------------------------------------------------------------------------------------------------
def test_a_site_that_brings_a_near_tolerance_error_within_it_is_the_culprit():
    """A 1.5 % error that one site's promotion brings to 1 % (not half of 1.5 %) is still that site's."""
    assert _audit(0.015, _site("a", TOL)).culprit == "a"  # exactly at the tolerance: fixed
    assert _audit(0.015, _site("a", 0.009)).culprit == "a"
    assert _audit(0.015, _site("a", TOL * 1.01)).culprit == ""


def test_causes_in_full_for_an_outside_error_and_an_op_without_a_namespace():
    outside = _audit(0.4, _site("a", 0.3), all_sites=0.3)
    assert outside.cause == ("rounding changes the gradient by 40.0% (norm 2 vs 1 in float64); it comes from ops "
                             "outside the linear-algebra calls (run the whole loss in float64 to confirm)")
    det = _audit(3.0, _site("d", 1e-3, "det"))
    assert det.culprit == "d" and det.cause.startswith("float32 rounding in the det backward, at d (m.py:3")
    assert det.remedies == ("compute this det in float64 (cast its input up, its outputs back)",)


def test_format_audit_lists_the_five_worst_parameters():
    audit = precision.replace(_audit(3.0), parameters={f"p{k}": k / 10 for k in range(7)})
    listed = [ln.split(":")[0] for ln in format_audit(audit).splitlines() if ln.startswith("parameter ")]
    assert listed == ["parameter p6", "parameter p5", "parameter p4", "parameter p3", "parameter p2"]


# -- what the audit is given ----------------------------------------------------------------------------------------
def test_errors_say_what_is_missing_in_full():
    with pytest.raises(PrecisionAuditError) as err:
        audit_precision(lambda v: v.sum(), torch.ones(2), roots={})
    assert str(err.value) == ("audit_precision: no trainable parameter under the roots (none found); pass "
                              "roots={'model': model}")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(PrecisionAuditError, match=re.escape("under the roots ['frozen']; pass")):
        audit_precision(lambda m: m.weight.sum(), frozen, roots={"frozen": frozen})
    model = _Inv()
    with pytest.raises(PrecisionAuditError) as err:
        audit_precision(lambda m: m.A.detach().sum(), model, roots={"model": model})
    assert str(err.value) == "audit_precision: the loss does not require grad; nothing to compare"


class _Mixed(nn.Module):
    """The inverse model with a frozen, an unused and a shared parameter."""

    def __init__(self):
        super().__init__()
        self.inv = _Inv()
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.unused = nn.Parameter(torch.ones(3))
        self.norm = nn.BatchNorm1d(1)

    def forward(self, y, *, scale):
        return self.inv(y) * scale + self.norm(y).sum() * self.frozen.sum()


def test_frozen_unused_shared_parameters_keyword_arguments_and_buffers():
    """Frozen parameters are not audited, an unused one has no error, a module under two roots counts once, the
    loss's keyword arguments reach it, and BatchNorm's running statistics are left as found."""
    model = _Mixed()
    stats = model.norm.running_mean.clone(), model.norm.running_var.clone()
    audit = audit_precision(lambda m, y, *, scale: m(y, scale=scale), model, Y, scale=3.0,
                            roots={"model": model, "again": model})
    assert list(audit.parameters) == ["model.unused", "model.inv.A", "model.norm.weight", "model.norm.bias"]
    assert audit.parameters["model.unused"] == 0.0
    assert torch.equal(model.norm.running_mean, stats[0]) and torch.equal(model.norm.running_var, stats[1])
    twin = _Mixed().double()
    twin.load_state_dict(model.state_dict())
    reference = _grad(twin(Y.double(), scale=3.0), twin.inv.A)
    assert audit.reference_norm == pytest.approx(float(reference.norm()), rel=1e-6)  # the scale reached the loss


def test_roots_are_found_in_the_loss_closure():
    model = _Inv()
    audit = audit_precision(lambda v: model(v), Y)
    assert list(audit.parameters) == ["model.A"] and audit.sites[0].site == "model:linalg.inv"


class _ComplexInv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.Z = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64) + 2 * torch.eye(3))

    def forward(self, y):
        return (torch.linalg.inv(self.Z) @ y).abs().square().sum()


def test_complex_parameters_are_audited_on_their_real_and_imaginary_parts():
    model, y = _ComplexInv(), torch.ones(3, 1, dtype=torch.complex64)
    audit = audit_precision(lambda m, v: m(v), model, y, roots={"model": model})
    g = _grad(model(y), model.Z)
    twin = _ComplexInv()
    twin.Z = nn.Parameter(model.Z.detach().to(torch.complex128))
    reference = _grad(twin(y.to(torch.complex128)), twin.Z).to(torch.complex64)  # reaches Z in its own dtype
    assert audit.grad_norm == pytest.approx(float(g.norm()), rel=1e-6)
    assert audit.baseline_error == pytest.approx(relative_error(g, reference), rel=1e-3)
    assert audit.parameters["model.Z"] == pytest.approx(audit.baseline_error, rel=1e-6) and audit.ok


class _Huge(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self):
        return (self.w * 1e25).sum()


def test_a_huge_float32_gradient_has_a_finite_norm():
    """An exploding float32 gradient (1e25 per entry: its squares overflow float32) is measured in float64."""
    model = _Huge()
    audit = audit_precision(lambda m: m(), model, roots={"model": model})
    assert audit.grad_norm == pytest.approx(2e25, rel=1e-6) and audit.reference_norm == pytest.approx(2e25, rel=1e-6)
    assert audit.ok and audit.sites == ()


# -- the sites ------------------------------------------------------------------------------------------------------
class _Pair(nn.Module):
    """Two inverses in one forward: an ill-conditioned one, whose float32 rounding shows, and a benign one."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(_Inv().A.detach().clone())
        torch.manual_seed(1)
        self.B = nn.Parameter(torch.eye(4) * 2 + 0.1 * torch.randn(4, 4))

    def forward(self, y):
        bad = (torch.linalg.inv(self.A) @ y).square().sum() * 1e-10
        good = torch.linalg.inv(self.B) @ y
        return bad + good.sum()


def test_two_sites_of_one_op_in_one_module_are_told_apart_and_promoted_alone(monkeypatch):
    _locate_in(monkeypatch, _Pair.forward)
    model = _Pair()
    audit = audit_precision(lambda m, v: m(v), model, Y, roots={"model": model})
    bad, good = audit.sites
    assert bad.site == "model:linalg.inv" and bad.location == _line(_Pair.forward, "self.A")
    assert good.site == "model:linalg.inv@" + good.location and good.location == _line(_Pair.forward, "self.B")
    assert (bad.module, good.module) == ("model", "model")
    # each site is compared with its own line's reference (inv(A) passes A's gradient back: the parameter's error)
    assert bad.grad_error == pytest.approx(audit.parameters["model.A"], rel=1e-3)
    assert good.grad_error < 1e-6  # float32 rounding only
    assert audit.baseline_error > 1e-5  # float32 rounding of the ill-conditioned inverse
    assert bad.promoted_error < audit.baseline_error / 1000
    assert good.promoted_error == pytest.approx(audit.baseline_error, rel=0.01)  # promoting it alone changes little
    assert bad.herm_err < 1e-6 and good.herm_err == pytest.approx(float(hermitian_error(model.B).max()), rel=1e-6)


class _Eig(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.A = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))

    def forward(self):
        w, V = torch.linalg.eig(self.A)
        return (V.abs().square() * torch.arange(4.0)).sum() + w.abs().sum()


def test_eig_diagnostics_are_those_of_its_backward():
    """The gap terms and phase noise reported for an eig site are the terms of torch's eig backward."""
    model = _Eig()
    audit = audit_precision(lambda m: m(), model, roots={"model": model})
    (site,) = audit.sites
    w, V = torch.linalg.eig(model.A.detach())
    V = V.requires_grad_()
    loss = (V.abs().square() * torch.arange(4.0)).sum()
    (gV,) = torch.autograd.grad(loss, [V])
    VhgV = V.detach().mH @ gV
    gaps = (w.unsqueeze(-2) - w.unsqueeze(-1)).conj()
    off = ~torch.eye(4, dtype=torch.bool)
    assert site.gap_terms == pytest.approx(float((VhgV / gaps).abs()[off].max()), rel=1e-3)
    assert site.phase_noise == pytest.approx(float(VhgV.diagonal().imag.abs().max()), rel=1e-3, abs=1e-6)
    assert site.lambda_max == pytest.approx(float(w.abs().max()), rel=1e-6)
    assert site.herm_err == pytest.approx(float(hermitian_error(model.A).max()), rel=1e-5)
    assert math.isfinite(site.grad_error) and site.grad_error < 1e-3


class _Tuples(nn.Module):
    """Ops that return tuples: a batched non-square svd, slogdet and inv_ex; and a 1-D norm (no matrix)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.A = nn.Parameter(torch.randn(3, 3) + 3 * torch.eye(3))

    def forward(self):
        s = torch.linalg.svd(self.A.unsqueeze(0).expand(2, 3, 3)[:, :, :2]).S.sum()
        logdet = torch.linalg.slogdet(self.A).logabsdet
        inverse = torch.linalg.inv_ex(self.A).inverse.sum()
        return s + logdet + inverse + self.A.reshape(-1).norm()


def test_sites_of_ops_that_return_tuples_pass_their_gradients_back():
    model = _Tuples()
    audit = audit_precision(lambda m: m(), model, roots={"model": model})
    sites = {s.op: s for s in audit.sites}
    assert list(sites) == ["linalg.svd", "linalg.slogdet", "linalg.inv_ex"]  # the vector norm is no site
    for s in sites.values():
        assert math.isfinite(s.grad_error) and s.grad_error < 1e-4 and s.lambda_max == 0.0
    assert sites["linalg.svd"].herm_err == 0.0  # non-square: not a Hermitian candidate
    assert sites["linalg.slogdet"].herm_err == pytest.approx(float(hermitian_error(model.A).max()), rel=1e-5)


class _Partly(nn.Module):
    """A site called twice whose second result is not used; an inverse only the float32 run computes."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.eye(3) * 2)

    def forward(self):
        first, _ = [torch.linalg.inv(self.A * k) for k in (1.0, 2.0)]
        h = self.A * 1.0
        other = torch.linalg.inv(h) if h.dtype == torch.float32 else torch.linalg.solve(h, torch.eye(3))
        return first.sum() + other.sum()


def test_site_gradients_that_cannot_be_compared_are_said_so(monkeypatch):
    _locate_in(monkeypatch, _Partly.forward)
    model = _Partly()
    audit = audit_precision(lambda m: m(), model, roots={"model": model})
    loop, float32_only = audit.sites
    assert loop.calls == 2 and math.isnan(loop.grad_error)  # one of two calls passed a gradient back
    assert float32_only.calls == 1 and math.isnan(float32_only.grad_error)  # no such site in float64
    assert format_audit(audit).count("site gradient error not compared (no gradient reaches its outputs)") == 2
    assert audit.ok and audit.baseline_error < 1e-6


# -- promotion: keyword matrices and the reference's dtypes ----------------------------------------------------------
def test_keyword_matrices_are_sites_and_keep_their_other_arguments():
    torch.manual_seed(4)
    a = torch.randn(4, 3)
    sq = a[:3] + 3 * torch.eye(3)
    with SitePromotion({}, None) as mode:
        promoted = torch.linalg.inv(A=sq), torch.det(input=sq), torch.linalg.svd(a, full_matrices=False)
    assert torch.equal(promoted[0], torch.linalg.inv(sq.double()).float())
    assert torch.equal(promoted[1], torch.det(sq.double()).float())
    assert promoted[2].U.shape == (4, 3) and promoted[2].U.dtype == torch.float32
    assert [s.op for s in mode.sites.values()] == ["linalg.inv", "det", "linalg.svd"]
    with SitePromotion({}) as mode:  # recording only
        recorded = torch.linalg.inv(A=sq), torch.linalg.svd(a, full_matrices=False)
    assert torch.equal(recorded[0], torch.linalg.inv(sq)) and recorded[1].U.shape == (4, 3)
    assert len(mode.sites) == 2
    with Float64Everything({}) as mode:
        reference = torch.linalg.inv(A=sq)
    assert reference.dtype == torch.float64 and [s.op for s in mode.sites.values()] == ["linalg.inv"]


def test_the_reference_runs_in_float64_seen_from_outside():
    """Dtypes read after the reference run (inside it every tensor reads as float64 / complex128)."""
    x = torch.ones(2, 2)
    h = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    with Float64Everything({}) as mode:
        out = (x.float(), x.half(), x.to(torch.complex64), x.cfloat(), torch.zeros(2, dtype=torch.int64),
               x.to(torch.float64), x @ x, torch.linalg.eigh(h).eigenvalues)
    assert [t.dtype for t in out] == [torch.float64, torch.float64, torch.complex128, torch.complex128, torch.int64,
                                      torch.float64, torch.float64, torch.float64]
    (site,) = mode.sites.values()  # the matmul is no linalg site
    assert site.op == "linalg.eigh" and site.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(h).max()))


def test_relative_error_is_relative_below_a_unit_norm():
    assert relative_error(torch.tensor([1.0]), torch.tensor([0.5], dtype=torch.float64)) == pytest.approx(1.0)
    assert relative_error(torch.tensor([0.3, 0.4]), torch.zeros(2, dtype=torch.float64)) == pytest.approx(0.5)
