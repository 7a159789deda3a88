"""Run a loss with chosen linear-algebra call sites (or everything) in float64 / complex128.

Two TorchFunctionModes for the precision audit (:mod:`ris_stability.instruments.precision`):

* :class:`SitePromotion` runs the linalg calls of the chosen sites on float64 / complex128 copies of
  their inputs and casts the results back to the dtype the call would have returned, so only that
  op's rounding changes (its backward runs in the higher precision too). With ``promote=frozenset()``
  it changes nothing and only records the sites and their diagnostics.
* :class:`Float64Everything` runs every torch call on float64 / complex128 copies of its floating
  arguments and rewrites requested low-precision dtypes (``.to(torch.complex64)``, ``.float()``), so
  the whole loss is computed in double precision: the reference.

A site is (module path, op, source line) as the probe names it; the calls of one site in a per-sample
Python loop are one site. Both modes record, per site, the gradient each call passes back to its
matrix (a node hook, float64 copies), so the audit can compare gradients per site. Parameters keep
their dtype: casts are differentiable, so gradients reach them in their own dtype.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ris_stability.observe.guard import guarded

from ris_stability.observe.frames import caller_location
from ris_stability.numerics.stats import hermitian_error
from ris_stability.linalg.registry import entry_by_function
from ris_stability.observe.tracker import ModuleTracker

HIGH = {torch.float16: torch.float64, torch.bfloat16: torch.float64, torch.float32: torch.float64,
        torch.complex32: torch.complex128, torch.complex64: torch.complex128}
LOW_OF = {torch.float64: torch.float32, torch.complex128: torch.complex64}

# Linear-algebra functions the probe does not observe but whose precision the audit can change.
_EXTRA_LINALG: dict[Callable, str] = {
    torch.linalg.det: "linalg.det", torch.linalg.slogdet: "linalg.slogdet", torch.linalg.matrix_exp:
    "linalg.matrix_exp", torch.det: "det", torch.Tensor.det: "det", torch.logdet: "logdet",
}


@functools.lru_cache(maxsize=1)
def _linalg_names() -> dict[Callable, str]:
    """Original torch callable -> op name: the probe's entry points (unwrapped) and the extras."""
    return {**{f: e.name for f, e in entry_by_function().items()}, **_EXTRA_LINALG}


MAX_GRAD_COPY = 1 << 20  # elements of one call's matrix gradient kept for the per-site comparison


def _up(value: Any) -> Any:
    if isinstance(value, Tensor) and value.dtype in HIGH:
        return value.to(HIGH[value.dtype])
    if isinstance(value, torch.dtype):
        return HIGH.get(value, value)
    if isinstance(value, (list, tuple)):
        return type(value)(_up(v) for v in value)
    return value


def _down(value: Any, low_real: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.dtype in LOW_OF:
        return value.to(low_real.to_complex() if value.dtype.is_complex else low_real)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # torch.return_types named tuples
        return type(value)([_down(v, low_real) for v in value])
    if isinstance(value, (list, tuple)):
        return type(value)(_down(v, low_real) for v in value)
    return value


def _matrix(args: tuple, kwargs: Mapping[str, Any]) -> Tensor | None:
    m = args[0] if args else kwargs.get("A", kwargs.get("input"))
    return m if isinstance(m, Tensor) and m.dim() >= 2 else None


@dataclass
class SiteRecord:
    """What one call site did in one run: its calls, the gradients they passed back to their matrices
    (float64/complex128, flattened, in call order) and the diagnostics of the eig backward."""

    name: str
    op: str
    module: str
    location: str
    dtype: str = ""
    calls: int = 0
    grads: list[Tensor] = field(default_factory=list)
    lambda_max: float = 0.0      # largest |eigenvalue| over the calls (eig / eigh)
    herm_err: float = 0.0        # largest ||A - A^H|| / ||A|| over the calls
    phase_noise: float = 0.0     # eig backward: largest |Im diag(V^H gV)| (zero in exact arithmetic
    gap_terms: float = 0.0       # for a phase-invariant loss) vs largest |(V^H gV)_ij / (l_j - l_i)|

    def grad_vector(self) -> Tensor | None:
        return torch.cat(self.grads) if self.grads and len(self.grads) == self.calls else None


class _SiteModes(TorchFunctionMode):
    """Shared bookkeeping: module stack, site names, per-call gradient and eig diagnostics."""

    def __init__(self, roots: Mapping[str, nn.Module]):
        super().__init__()
        self.modules = ModuleTracker(roots)
        self.sites: dict[tuple[str, str, str], SiteRecord] = {}

    def site(self, op: str) -> SiteRecord:
        module, location = self.modules.current(), caller_location()
        key = (module, op, location)
        if key not in self.sites:
            taken = {s.name for s in self.sites.values()}
            name = f"{module}:{op}" if module else op
            self.sites[key] = SiteRecord(name if name not in taken else f"{name}@{location}", op, module, location)
        return self.sites[key]

    def observe(self, site: SiteRecord, func: Callable, A: Tensor, out: Any) -> None:
        site.calls += 1
        site.dtype = site.dtype or str(A.dtype).removeprefix("torch.")
        with torch.no_grad():
            if A.shape[-1] == A.shape[-2] and bool(torch.isfinite(A).all()):
                site.herm_err = max(site.herm_err, float(hermitian_error(A).max()))
        first = out[0] if isinstance(out, tuple) else out
        if isinstance(first, Tensor) and first.grad_fn is not None:
            first.grad_fn.register_hook(self._grad_hook(site))
        if func in (torch.linalg.eig, torch.linalg.eigh) and isinstance(out, tuple):
            w, V = out
            site.lambda_max = max(site.lambda_max, float(w.detach().abs().max()))
            if func == torch.linalg.eig and V.requires_grad:  # ==: an observed eig stands in equal
                V.register_hook(self._eig_hook(site, w.detach(), V.detach()))

    @staticmethod
    def _grad_hook(site: SiteRecord) -> Callable:
        @guarded("precision.backward_hooks")
        def hook(grad_inputs, grad_outputs):
            g = grad_inputs[0] if grad_inputs else None
            if g is not None and g.numel() <= MAX_GRAD_COPY:
                site.grads.append(g.detach().to(torch.complex128 if g.is_complex() else torch.float64).reshape(-1))
        return hook

    @staticmethod
    def _eig_hook(site: SiteRecord, w: Tensor, V: Tensor) -> Callable:
        @guarded("precision.backward_hooks")
        def hook(gV: Tensor | None) -> None:
            if gV is None:  # the loss uses only the eigenvalues (ESPRIT's rotation eig): no eigenvector terms
                return None
            # The terms torch's eig backward forms, in the precision it forms them (see linalg_eig_backward).
            with torch.no_grad():
                VhgV = V.mH @ gV
                E = w.unsqueeze(-2) - w.unsqueeze(-1)
                off = ~torch.eye(w.shape[-1], dtype=torch.bool, device=w.device)
                noise = VhgV.diagonal(dim1=-2, dim2=-1).imag.abs().max()
                terms = torch.where(off, (VhgV / E.conj()).abs(), torch.zeros_like(E.real)).max()
                site.phase_noise = max(site.phase_noise, float(noise))
                site.gap_terms = max(site.gap_terms, float(terms))
        return hook


class SitePromotion(_SiteModes):
    """Linalg calls of the sites in ``promote`` (names, or None for every site) run in float64 /
    complex128; all linalg calls are recorded."""

    def __init__(self, roots: Mapping[str, nn.Module], promote: frozenset[str] | None = frozenset()):
        super().__init__(roots)
        self.promote = promote

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _linalg_names().get(func)
        A = _matrix(args, kwargs) if op else None
        if A is None or not (A.is_floating_point() or A.is_complex()):
            return func(*args, **kwargs)
        site = self.site(op)
        if (self.promote is None or site.name in self.promote) and A.dtype in HIGH:
            low_real = A.dtype.to_real() if A.is_complex() else A.dtype
            high = func(*_up(tuple(args)), **{k: _up(v) for k, v in kwargs.items()})
            self.observe(site, func, _up(A), high)
            return _down(high, low_real)
        out = func(*args, **kwargs)
        self.observe(site, func, A, out)
        return out


_LOW_METHODS = {torch.Tensor.float: torch.Tensor.double, torch.Tensor.half: torch.Tensor.double,
                torch.Tensor.bfloat16: torch.Tensor.double, torch.Tensor.cfloat: torch.Tensor.cdouble}


class Float64Everything(_SiteModes):
    """Every torch call on float64 / complex128 arguments; requested low dtypes become high ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        func = _LOW_METHODS.get(func, func)
        args, kwargs = _up(tuple(args)), {k: _up(v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        op = _linalg_names().get(func)
        A = _matrix(args, kwargs) if op else None
        if A is not None and (A.is_floating_point() or A.is_complex()):
            self.observe(self.site(op), func, A, out)
        return out


def relative_error(a: Tensor | None, ref: Tensor | None) -> float:
    """||a - ref|| / ||ref|| in float64 (absolute when ref is 0); NaN when either is missing or the
    shapes differ (e.g. a site called a different number of times)."""
    if a is None or ref is None or a.shape != ref.shape:
        return math.nan
    diff = float(torch.linalg.vector_norm((a.to(ref.dtype) - ref)))
    scale = float(torch.linalg.vector_norm(ref))
    return diff / scale if scale > 0 else diff
