"""The precision audit: is this gradient right, or is it rounding?

``audit_precision(fn, *args, roots=None, **kwargs)`` computes the gradient of the scalar loss
``fn(*args, **kwargs)`` w.r.t. every parameter of the roots (discovered like the locator's when not
given) several times, each time from the same RNG state and without touching ``.grad``:

1. as the run computes it (the baseline), recording every linear-algebra call site;
2. with the whole loss in float64 / complex128 (the reference);
3. with every linalg site, then with each site alone, in float64 / complex128.

It compares gradients per parameter and per site (the gradient each site passes back to its matrix)
with the reference; a site whose promotion alone brings the gradient within ``PRECISION_GRAD_RTOL``
of the reference, where the baseline was not, is the op whose precision changes the gradient. The
cause is given in plain words with the measured numbers, e.g. for eig: "complex64 rounding in the eig
backward: eigenvalues up to 4.8e+11, phase term noise 4.6e-08 vs gap terms 1.8e-09". Nothing of the
run changes: gradients come from ``torch.autograd.grad`` and the RNG state is restored at the end.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ris_stability.records.capsule import capture_rng, restore_rng
from ris_stability.locate.inputs import _check_loss, bind_arguments, discover_roots
from ris_stability.instruments.promote import Float64Everything, SitePromotion, SiteRecord, relative_error
from ris_stability.numerics.tolerances import PRECISION_GRAD_RTOL, hermitian_input_tol

MAX_SITES = 8  # sites promoted one at a time; beyond that only "all sites" is tried


class PrecisionAuditError(RuntimeError):
    """The audit cannot compare gradients (no parameter, a loss without gradient, different graphs)."""


@dataclass(frozen=True)
class SiteAudit:
    site: str
    op: str
    module: str
    location: str
    dtype: str
    calls: int
    grad_error: float       # baseline gradient this site passes back vs the reference's
    promoted_error: float   # parameter gradient error with only this site in float64 / complex128
    lambda_max: float = 0.0
    herm_err: float = 0.0
    phase_noise: float = 0.0
    gap_terms: float = 0.0


@dataclass(frozen=True)
class PrecisionAudit:
    tolerance: float
    baseline_error: float               # all parameters, baseline vs float64 reference
    all_sites_error: float              # every linalg site promoted vs the reference
    grad_norm: float
    reference_norm: float
    parameters: dict[str, float]        # per-parameter relative error of the baseline
    sites: tuple[SiteAudit, ...]
    culprit: str = ""                   # the site whose precision changes the gradient ("" if none)
    cause: str = ""
    remedies: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.baseline_error > self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _named_params(roots: Mapping[str, nn.Module]) -> list[tuple[str, Tensor]]:
    seen, out = set(), []
    for root, module in roots.items():
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((".".join(x for x in (root, name) if x), p))
    return out


def _gradients(fn: Callable, args: tuple, kwargs: dict, params: list[Tensor], mode, rng) -> list[Tensor | None]:
    restore_rng(rng)
    with mode:
        loss = fn(*args, **kwargs)
    _check_loss(loss)
    if not loss.requires_grad:
        raise PrecisionAuditError("audit_precision: the loss does not require grad; nothing to compare")
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [None if g is None else g.detach().to(torch.complex128 if g.is_complex() else torch.float64)
            for g in grads]


def _flat(grads: list[Tensor | None], params: list[Tensor]) -> Tensor:
    parts = [(g if g is not None else torch.zeros_like(p, dtype=torch.float64)).reshape(-1)
             for g, p in zip(grads, params)]
    parts = [torch.view_as_real(x).reshape(-1) if x.is_complex() else x for x in parts]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def audit_precision(fn: Callable, /, *args: Any, roots: Mapping[str, nn.Module] | None = None,
                    tolerance: float = PRECISION_GRAD_RTOL, **kwargs: Any) -> PrecisionAudit:
    """Audit the gradient of ``fn(*args, **kwargs)`` against float64 (see the module docstring)."""
    roots = dict(roots) if roots is not None else discover_roots(fn, bind_arguments(fn, args, kwargs))
    named = _named_params(roots)
    if not named:
        raise PrecisionAuditError("audit_precision: no trainable parameter under the roots "
                                  f"{sorted(roots) or '(none found)'}; pass roots={{'model': model}}")
    names, params = [n for n, _ in named], [p for _, p in named]
    rng = capture_rng()
    # Forward passes update buffers (BatchNorm running statistics): the audit must leave them as found.
    buffers = [(b, b.detach().clone()) for root in roots.values() for b in root.buffers()]
    try:
        base_mode, ref_mode = SitePromotion(roots), Float64Everything(roots)
        base = _gradients(fn, args, kwargs, params, base_mode, rng)
        ref = _gradients(fn, args, kwargs, params, ref_mode, rng)
        g, g_ref = _flat(base, params), _flat(ref, params)
        per_param = {n: relative_error(a if a is not None else torch.zeros(0), b if b is not None else torch.zeros(0))
                     for n, a, b in zip(names, base, ref)}
        promoted = _flat(_gradients(fn, args, kwargs, params, SitePromotion(roots, None), rng), params)
        records = list(base_mode.sites.values())
        ref_sites = {(s.module, s.op, s.location): s for s in ref_mode.sites.values()}
        site_audits = []
        for rec in records:
            only = math.nan
            if len(records) <= MAX_SITES:
                mode = SitePromotion(roots, frozenset({rec.name}))
                only = relative_error(_flat(_gradients(fn, args, kwargs, params, mode, rng), params), g_ref)
            site_audits.append(_site_audit(rec, ref_sites.get((rec.module, rec.op, rec.location)), only))
    finally:
        restore_rng(rng)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    audit = PrecisionAudit(tolerance=tolerance, baseline_error=relative_error(g, g_ref),
                           all_sites_error=relative_error(promoted, g_ref), grad_norm=float(g.norm()),
                           reference_norm=float(g_ref.norm()), parameters=per_param, sites=tuple(site_audits))
    return _explain(audit)


def _site_audit(rec: SiteRecord, ref: SiteRecord | None, only: float) -> SiteAudit:
    return SiteAudit(site=rec.name, op=rec.op, module=rec.module, location=rec.location, dtype=rec.dtype,
                     calls=rec.calls, grad_error=relative_error(rec.grad_vector(), ref.grad_vector() if ref else None),
                     promoted_error=only, lambda_max=rec.lambda_max, herm_err=rec.herm_err,
                     phase_noise=rec.phase_noise, gap_terms=rec.gap_terms)


def _culprit(audit: PrecisionAudit) -> SiteAudit | None:
    """The site whose promotion alone fixes the gradient; else the one that reduces the error most."""
    tried = [s for s in audit.sites if not math.isnan(s.promoted_error)]
    fixing = [s for s in tried if s.promoted_error <= audit.tolerance]
    pool = fixing or [s for s in tried if s.promoted_error < audit.baseline_error / 2]
    return min(pool, key=lambda s: s.promoted_error) if pool else None


def _explain(audit: PrecisionAudit) -> PrecisionAudit:
    if audit.ok:
        return replace(audit, cause=f"the gradient agrees with the float64 reference within "
                                    f"{audit.baseline_error:.1e} (tolerance {audit.tolerance:.0e})")
    site = _culprit(audit)
    if site is None:
        where = ("the linear-algebra ops together" if audit.all_sites_error <= audit.tolerance
                 else "ops outside the linear-algebra calls (run the whole loss in float64 to confirm)")
        return replace(audit, cause=f"rounding changes the gradient by {audit.baseline_error:.1%} "
                                    f"(norm {audit.grad_norm:.3g} vs {audit.reference_norm:.3g} in float64); "
                                    f"it comes from {where}",
                       remedies=("compute the loss in float64 / complex128", RESCALE_INPUT))
    cause, remedies = _site_cause(site, audit)
    return replace(audit, culprit=site.site, cause=cause, remedies=remedies)


RESCALE_INPUT = ("rescale the matrix before the decomposition (e.g. divide by its trace or norm and scale "
                 "the result back): the eigenvectors do not change")


def _site_cause(s: SiteAudit, audit: PrecisionAudit) -> tuple[str, tuple[str, ...]]:
    high = "complex128" if s.dtype.startswith("complex") else "float64"
    base = s.op.split(".")[-1]
    what = f"{s.dtype} rounding in the {base} backward"
    if base == "eig" and s.phase_noise > s.gap_terms:
        # torch's eig backward keeps i*Im diag(V^H gV) undivided while the off-diagonal terms are
        # divided by the eigenvalue gaps; for a phase-invariant loss that imaginary part is pure rounding.
        what += (f": eigenvalues up to {s.lambda_max:.1e}, phase term noise {s.phase_noise:.1e} vs gap terms "
                 f"{s.gap_terms:.1e} (the phase term is exactly 0 for a phase-invariant loss, so all of it is "
                 "rounding, and unlike the gap terms it is not divided by the eigenvalue gaps)")
    text = (f"{what}, at {s.site} ({s.location}, {s.calls} call(s)): gradient norm {audit.grad_norm:.3g} vs "
            f"{audit.reference_norm:.3g} in float64 (relative error {audit.baseline_error:.2g}); with only this "
            f"{base} in {high} the error is {s.promoted_error:.1e}")
    remedies = [f"compute this {base} in {high} (cast its input up, its outputs back)"]
    if base in ("eig", "eigvals") and s.herm_err <= hermitian_input_tol(s.dtype):
        remedies.append(f"the input is Hermitian (relative error {s.herm_err:.1e}): use torch.linalg.eigh, "
                        "whose backward has no phase term and whose eigenvalues are real and sorted")
    if base == "eig":
        remedies.append(RESCALE_INPUT + "; the eig backward's gap terms shrink as 1/|eigenvalue| while its "
                        "rounding noise does not")
    elif base in ("eigh", "svd"):
        remedies.append(RESCALE_INPUT)
    return text, tuple(remedies)


def _error(value: float) -> str:
    # NaN here means "not compared" (no gradient reached the site's outputs in one of the two runs, or its
    # calls differ), not a non-finite gradient: say so rather than print "nan" on a finite step.
    return f"{value:.2e}" if math.isfinite(value) else "not compared (no gradient reaches its outputs)"


def format_audit(audit: PrecisionAudit) -> str:
    """Plain-text summary (for logs and the CLI)."""
    lines = [f"gradient vs float64 reference: relative error {audit.baseline_error:.2e} "
             f"(tolerance {audit.tolerance:.0e}); all linalg sites in float64: {audit.all_sites_error:.2e}",
             f"cause: {audit.cause}"]
    for s in audit.sites:
        lines.append(f"site {s.site} ({s.op}, {s.calls} call(s), {s.dtype}): site gradient error "
                     f"{_error(s.grad_error)}; alone in float64 -> {_error(s.promoted_error)}")
    worst = sorted(audit.parameters.items(), key=lambda kv: -(kv[1] if math.isfinite(kv[1]) else math.inf))[:5]
    lines += [f"parameter {n}: relative error {e:.2e}" for n, e in worst]
    lines += [f"remedy: {r}" for r in audit.remedies]
    return "\n".join(lines)
