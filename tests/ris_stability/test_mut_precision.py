"""The precision audit's verdict and the promotion under it: which site is the culprit, when a gradient is "ok",
which remedies are offered (instruments/precision.py), and that promoting a site really computes it in float64 /
complex128 and nothing else (instruments/promote.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ris_stability import audit_precision
from ris_stability.instruments import precision
from ris_stability.instruments.precision import (PrecisionAudit, PrecisionAuditError, SiteAudit, format_audit)
from ris_stability.instruments.promote import Float64Everything, SitePromotion, relative_error
from ris_stability.numerics.tolerances import PRECISION_GRAD_RTOL, hermitian_input_tol

TOL = PRECISION_GRAD_RTOL


def _site(name: str, promoted: float, op: str = "linalg.inv", dtype: str = "float32", **kw) -> SiteAudit:
    return SiteAudit(site=name, op=op, module="m", location="m.py:3", dtype=dtype, calls=1, grad_error=0.5,
                     promoted_error=promoted, **kw)


def _audit(baseline: float, *sites: SiteAudit, all_sites: float = 0.5) -> PrecisionAudit:
    return precision._explain(PrecisionAudit(tolerance=TOL, baseline_error=baseline, all_sites_error=all_sites,
                                             grad_norm=2.0, reference_norm=1.0, parameters={"w": baseline},
                                             sites=sites))


# -- the verdict from the measurements ----------------------------------------------------------------------------
def test_ok_only_within_the_tolerance():
    assert _audit(TOL).ok and _audit(0.0).ok
    for error in (TOL * 1.01, 0.5, 5.0, math.inf):  # 5.0: a 500 % gradient error is not fine
        assert not _audit(error).ok
    assert _audit(math.nan).ok  # NaN: nothing was compared, no verdict against the gradient
    ok = _audit(1e-4)
    assert ok.cause == "the gradient agrees with the float64 reference within 1.0e-04 (tolerance 1e-02)"
    assert ok.culprit == "" and ok.remedies == ()


def test_the_culprit_is_the_site_whose_promotion_fixes_most():
    audit = _audit(3.0, _site("a", 5e-3), _site("b", 1e-3), _site("c", 2.0), _site("d", math.nan))
    assert audit.culprit == "b"
    assert audit.cause == ("float32 rounding in the inv backward, at b (m.py:3, 1 call(s)): gradient norm 2 vs 1 in "
                           "float64 (relative error 3); with only this inv in float64 the error is 1.0e-03")
    assert audit.remedies == ("compute this inv in float64 (cast its input up, its outputs back)",)


def test_without_a_fixing_site_the_best_halving_site_is_named():
    audit = _audit(3.0, _site("a", 1.4), _site("b", 0.5), _site("c", 1.6))
    assert audit.culprit == "b"
    assert _audit(3.0, _site("a", 1.5)).culprit == ""  # exactly half: not enough
    assert _audit(3.0, _site("a", 1.49)).culprit == "a"
    assert _audit(3.0, _site("a", TOL)).culprit == "a"  # at the tolerance: fixes


def test_no_culprit_says_where_the_error_comes_from():
    linalg = _audit(0.4, _site("a", 0.3), all_sites=TOL)
    assert linalg.culprit == "" and "it comes from the linear-algebra ops together" in linalg.cause
    assert linalg.cause == ("rounding changes the gradient by 40.0% (norm 2 vs 1 in float64); it comes from the "
                            "linear-algebra ops together")
    assert precision.RESCALE_INPUT == ("rescale the matrix before the decomposition (e.g. divide by its trace or norm "
                                       "and scale the result back): the eigenvectors do not change")
    outside = _audit(0.4, _site("a", 0.3), all_sites=0.3)
    assert "ops outside the linear-algebra calls" in outside.cause
    assert outside.remedies == ("compute the loss in float64 / complex128", precision.RESCALE_INPUT)


def test_remedies_follow_the_op_and_the_hermitian_check():
    tol = hermitian_input_tol("complex64")
    herm = _audit(3.0, _site("e", 1e-3, "linalg.eig", "complex64", herm_err=tol, phase_noise=1.0, gap_terms=0.1,
                             lambda_max=4.8e11))
    assert herm.remedies[0] == "compute this eig in complex128 (cast its input up, its outputs back)"
    assert herm.remedies[1] == (f"the input is Hermitian (relative error {tol:.1e}): use torch.linalg.eigh, whose "
                                "backward has no phase term and whose eigenvalues are real and sorted")
    assert herm.remedies[2] == (precision.RESCALE_INPUT + "; the eig backward's gap terms shrink as 1/|eigenvalue| "
                                "while its rounding noise does not")
    assert herm.cause == ("complex64 rounding in the eig backward: eigenvalues up to 4.8e+11, phase term noise 1.0e+00 "
                          "vs gap terms 1.0e-01 (the phase term is exactly 0 for a phase-invariant loss, so all of it "
                          "is rounding, and unlike the gap terms it is not divided by the eigenvalue gaps), at e "
                          "(m.py:3, 1 call(s)): gradient norm 2 vs 1 in float64 (relative error 3); with only this "
                          "eig in complex128 the error is 1.0e-03")
    general = _audit(3.0, _site("e", 1e-3, "linalg.eig", "complex64", herm_err=tol * 1.1))
    assert not any("eigh" in r for r in general.remedies) and len(general.remedies) == 2
    assert "phase term noise" not in general.cause  # no phase noise above the gap terms
    vals = _audit(3.0, _site("v", 1e-3, "linalg.eigvals", "complex64", herm_err=0.0))
    assert any("torch.linalg.eigh" in r for r in vals.remedies) and not any("rescale" in r for r in vals.remedies)
    for op in ("linalg.eigh", "linalg.svd"):
        assert _audit(3.0, _site("s", 1e-3, op, "float64")).remedies[1] == precision.RESCALE_INPUT
    inv = _audit(3.0, _site("i", 1e-3, "linalg.inv", "float32", herm_err=0.0))
    assert len(inv.remedies) == 1


def test_format_audit_lists_sites_worst_parameters_and_remedies():
    audit = _audit(3.0, _site("b", 1e-3), _site("x", math.nan))
    audit = precision.replace(audit, parameters={"p1": 0.1, "p2": math.nan, "p3": 3.0})
    text = format_audit(audit).splitlines()
    assert text[0] == ("gradient vs float64 reference: relative error 3.00e+00 (tolerance 1e-02); all linalg sites "
                       "in float64: 5.00e-01")
    assert text[1].startswith("cause: float32 rounding in the inv backward")
    assert text[2] == "site b (linalg.inv, 1 call(s), float32): site gradient error 5.00e-01; alone in float64 -> 1.00e-03"
    assert text[3].endswith("alone in float64 -> not compared (no gradient reaches its outputs)")
    assert [t.split(":")[0] for t in text[4:7]] == ["parameter p2", "parameter p3", "parameter p1"]
    assert text[-1] == "remedy: compute this inv in float64 (cast its input up, its outputs back)"


# -- promotion ----------------------------------------------------------------------------------------------------
class _Inv(nn.Module):
    """inv of diag(1, 1e-5) + a rotation: float32 rounding shows in its gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
        self.A = nn.Parameter((q @ torch.diag(torch.logspace(0, -5, 4, dtype=torch.float64)) @ q.T).float())

    def forward(self, y):
        return (torch.linalg.inv(self.A) @ y).square().sum() * 1e-10


def test_site_promotion_computes_only_the_chosen_site_in_float64():
    model, y = _Inv(), torch.ones(4, 1)
    low = torch.linalg.inv(model.A)
    high = torch.linalg.inv(model.A.double()).float()
    assert not torch.equal(low, high)
    with SitePromotion({"model": model}, None) as mode:
        everything = torch.linalg.inv(model.A)
    assert everything.dtype == torch.float32 and torch.equal(everything, high)
    (site,) = mode.sites.values()
    assert site.op == "linalg.inv" and site.calls == 1 and site.dtype == "float64" and site.name == "linalg.inv"
    with SitePromotion({"model": model}, frozenset({"linalg.inv"})):
        assert torch.equal(torch.linalg.inv(model.A), high)
    with SitePromotion({"model": model}, frozenset({"other"})) as mode:
        assert torch.equal(torch.linalg.inv(model.A), low)
    assert next(iter(mode.sites.values())).dtype == "float32"
    with SitePromotion({"model": model}) as mode:  # records only
        assert torch.equal(torch.linalg.inv(model.A), low) and len(mode.sites) == 1
    with Float64Everything({"model": model}):
        out = torch.linalg.inv(model.A) @ y
        assert out.dtype == torch.float64 and torch.ones(2).float().dtype == torch.float64
    assert y.dtype == torch.float32


def test_audit_of_an_inverse_promotes_the_culprit_to_the_reference():
    model, y = _Inv(), torch.ones(4, 1)
    audit = audit_precision(lambda m, v: m(v), model, y, roots={"model": model})
    twin = _Inv().double()
    with torch.no_grad():
        twin.A.copy_(model.A.double())
    reference = torch.autograd.grad(twin(y.double()), [twin.A])[0]
    g = torch.autograd.grad(model(y), [model.A])[0].double()
    assert audit.baseline_error == pytest.approx(relative_error(g, reference), rel=1e-3)
    assert audit.reference_norm == pytest.approx(float(reference.norm()), rel=1e-6)
    (site,) = audit.sites
    assert site.site == "model:linalg.inv" and site.calls == 1 and site.dtype == "float32"
    if audit.ok:  # float32 rounding of this inverse is below the 1 % tolerance on this platform
        assert audit.culprit == "" and audit.baseline_error <= TOL
    else:
        assert audit.culprit == "model:linalg.inv"
    assert site.promoted_error < audit.baseline_error / 10 and site.promoted_error < 1e-5
    assert audit.all_sites_error == pytest.approx(site.promoted_error)
    assert list(audit.parameters) == ["model.A"]


def test_audit_needs_parameters_and_a_differentiable_loss():
    model = _Inv()
    with pytest.raises(PrecisionAuditError, match="no trainable parameter"):
        audit_precision(lambda v: v.sum(), torch.ones(2), roots={})
    with pytest.raises(PrecisionAuditError, match="does not require grad"):
        audit_precision(lambda m: m.A.detach().sum(), model, roots={"model": model})


def test_relative_error():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert relative_error(a, b) == pytest.approx(1 / math.sqrt(2))
    assert relative_error(a, torch.zeros(2, dtype=torch.float64)) == pytest.approx(math.sqrt(5))  # absolute
    assert math.isnan(relative_error(None, b)) and math.isnan(relative_error(a, None))
    assert math.isnan(relative_error(torch.ones(3), b))


class _Many(nn.Module):
    def __init__(self, count: int):
        super().__init__()
        self.parts = nn.ModuleList(_Inv() for _ in range(count))

    def forward(self, y):
        return sum(part(y) for part in self.parts)


def test_each_site_alone_only_up_to_max_sites():
    y = torch.ones(4, 1)
    few, many = _Many(precision.MAX_SITES), _Many(precision.MAX_SITES + 1)
    audit = audit_precision(lambda m, v: m(v), few, y, roots={"model": few})
    assert [s.site for s in audit.sites] == [f"model.parts.{k}:linalg.inv" for k in range(precision.MAX_SITES)]
    assert all(math.isfinite(s.promoted_error) for s in audit.sites)
    audit = audit_precision(lambda m, v: m(v), many, y, roots={"model": many})
    assert len(audit.sites) == precision.MAX_SITES + 1 and all(math.isnan(s.promoted_error) for s in audit.sites)
    assert math.isfinite(audit.all_sites_error)


def test_site_and_parameter_errors_are_the_gradient_errors():
    model, y = _Inv(), torch.ones(4, 1)
    audit = audit_precision(lambda m, v: m(v), model, y, roots={"model": model})
    (site,) = audit.sites
    # the matrix of the inverse is the parameter itself: the gradient it passes back is the parameter's
    assert site.grad_error == pytest.approx(audit.baseline_error, rel=1e-3)
    assert audit.parameters["model.A"] == pytest.approx(audit.baseline_error, rel=1e-6)
    assert audit.grad_norm == pytest.approx(float(torch.autograd.grad(model(y), [model.A])[0].norm()), rel=1e-6)


def test_promoted_decompositions_keep_their_named_tuples_and_dtypes():
    torch.manual_seed(0)
    b = torch.randn(3, 3, dtype=torch.complex64)
    h = b @ b.mH + torch.eye(3)
    with SitePromotion({}, None) as mode:
        w, V = out = torch.linalg.eigh(h)
        e = torch.linalg.eig(h + 0.5 * torch.triu(torch.ones(3, 3), 1))
    assert isinstance(out, torch.return_types.linalg_eigh) and out.eigenvalues is w
    assert (w.dtype, V.dtype, e.eigenvalues.dtype) == (torch.float32, torch.complex64, torch.complex64)
    ref = torch.linalg.eigh(h.to(torch.complex128))
    assert torch.equal(w, ref.eigenvalues.float())  # computed in complex128, cast back
    sites = {s.op: s for s in mode.sites.values()}
    assert sites["linalg.eigh"].lambda_max == pytest.approx(float(ref.eigenvalues.abs().max()), rel=1e-6)
    assert sites["linalg.eigh"].herm_err < 1e-15 and sites["linalg.eig"].herm_err > 0.1
    assert sites["linalg.eigh"].dtype == "complex128"


def test_float64_everything_rewrites_requested_low_dtypes():
    x = torch.ones(2, dtype=torch.float32)
    with Float64Everything({}):
        assert x.float().dtype == torch.float64 and x.half().dtype == torch.float64
        assert x.to(torch.complex64).dtype == torch.complex128 and x.cfloat().dtype == torch.complex128
        assert (x * 2).dtype == torch.float64 and torch.arange(3).dtype == torch.int64
    assert x.float().dtype == torch.float32
