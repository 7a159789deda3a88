"""SpectralProbe: zero-touch spectral statistics of every linear-algebra call a model makes.

A TorchFunctionMode intercepts an allow-list of linalg calls (eigh, eigvalsh, svd, svdvals, cholesky,
inv, solve, lstsq, qr, eig, pinv and their old aliases); for each call site it records the statistics of
the input matrix (reusing the eigenvalues/singular values the op returned when it computes them),
whether the input requires grad, and whether the op's eigenvectors (U/V for svd) actually RECEIVE
gradient in backward: a hook on those outputs sets a device flag when the incoming gradient is
non-zero, so eigenvector hazards (tied gaps) are flagged only where the loss really uses the vectors.

Cost: while active, the mode sees every torch call (Python pass-through, ~5 us each), so a caller that
samples every N steps should enter the probe only on sampled steps (it can be entered again and again;
records accumulate until collect). Measured on an H200, transformer + batched 144x144 eigh step of
25 ms: probe active every step 1.15x, active but not sampling 1.09x, entered every 10th step 1.06x.

The probe never changes results: the intercepted op runs exactly as called, statistics are computed on
detached inputs under no_grad, the vector hooks return None, and nothing syncs with the device until
:meth:`SpectralProbe.collect`.

Usage::

    probe = SpectralProbe(roots={"model": model, "loss": loss_fn}, every=10, max_matrices=4)
    with probe:
        for i, batch in enumerate(loader):
            probe.step(i)
            loss = loss_fn(model(batch), batch); loss.backward(); ...
            if i % 10 == 0:
                log(probe.collect())     # after backward, so vec_grad is known
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from ris_stability.frames import caller_location
from ris_stability.linalg_stats import (
    STAT_KEYS, eigen_stats, hermitian_error, matrix_stats, singular_stats, to_floats, worst,
)
from ris_stability.records.schema import SettingError
from ris_stability.tolerances import tie_tol

log = logging.getLogger(__name__)

# How the statistics of each op are obtained:
#   eigh / eigvalsh / svd / svd_old / svdvals: reuse the spectrum the op returned;
#   herm: eigvalsh of the (Hermitian-by-contract) input; general: svdvals of the input;
#   eig / eigvals: svdvals of the input for conditioning, complex eigenvalue gaps from the output.
_OP_TABLE: tuple[tuple[Callable, str, str], ...] = (
    (torch.linalg.eigh, "linalg.eigh", "eigh"),
    (torch.linalg.eigvalsh, "linalg.eigvalsh", "eigvalsh"),
    (torch.linalg.svd, "linalg.svd", "svd"),
    (torch.linalg.svdvals, "linalg.svdvals", "svdvals"),
    (torch.linalg.cholesky, "linalg.cholesky", "herm"),
    (torch.linalg.cholesky_ex, "linalg.cholesky_ex", "herm"),
    (torch.linalg.inv, "linalg.inv", "general"),
    (torch.linalg.inv_ex, "linalg.inv_ex", "general"),
    (torch.linalg.solve, "linalg.solve", "general"),
    (torch.linalg.solve_ex, "linalg.solve_ex", "general"),
    (torch.linalg.lstsq, "linalg.lstsq", "general"),
    (torch.linalg.qr, "linalg.qr", "general"),
    (torch.linalg.pinv, "linalg.pinv", "general"),
    (torch.linalg.eig, "linalg.eig", "eig"),
    (torch.linalg.eigvals, "linalg.eigvals", "eigvals"),
    (torch.cholesky, "cholesky", "herm"),
    (torch.Tensor.cholesky, "cholesky", "herm"),
    (torch.inverse, "inverse", "general"),
    (torch.Tensor.inverse, "inverse", "general"),
    (torch.pinverse, "pinverse", "general"),
    (torch.Tensor.pinverse, "pinverse", "general"),
    (torch.svd, "svd", "svd_old"),
    (torch.Tensor.svd, "svd", "svd_old"),
)
OPS: dict[Callable, tuple[str, str]] = {func: (name, kind) for func, name, kind in _OP_TABLE}
# Outputs holding eigenvectors / singular vectors, by kind: their gradient is the tie hazard.
_VECTOR_OUTPUTS = {"eigh": (1,), "eig": (1,), "svd": (0, 2), "svd_old": (0, 2)}
# Ops whose input is Hermitian by contract, so a Hermitian error is a finding rather than noise.
_HERMITIAN_KINDS = frozenset({"eigh", "eigvalsh", "herm"})

_COMPACT_AFTER = 16  # per-site batches kept before they are reduced to one worst case on the device


class ProbeError(ValueError):
    """The probe was used in a way that cannot produce meaningful records."""


@dataclass
class _Site:
    """Accumulated records of one call site between two collect() calls."""
    name: str
    op: str
    location: str
    module: str
    calls: int = 0
    requires_grad: bool = False
    chunks: list[dict[str, Tensor]] = field(default_factory=list)
    vec: Tensor | None = None  # device bool: some eigenvector output received a non-zero gradient

    def add(self, stats: dict[str, Tensor], requires_grad: bool) -> None:
        self.calls += 1
        self.requires_grad = self.requires_grad or requires_grad
        self.chunks.append({key: value.reshape(-1) for key, value in stats.items()})
        if len(self.chunks) >= _COMPACT_AFTER:
            self.chunks = [{key: value.reshape(1) for key, value in self.reduced().items()}]

    def reduced(self) -> dict[str, Tensor]:
        return worst({key: torch.cat([chunk[key] for chunk in self.chunks]) for key in self.chunks[0]})

    def vector_hook(self) -> Callable[[Tensor | None], None]:
        def hook(grad: Tensor | None) -> None:
            # Called with None when the loss does not use this output; must never alter the gradient.
            if grad is not None:
                with torch.no_grad():
                    received = grad.ne(0).any()
                    self.vec = received if self.vec is None else self.vec | received.to(self.vec.device)
            return None
        return hook

    def reset(self) -> None:
        self.calls, self.requires_grad, self.chunks, self.vec = 0, False, [], None


def _matrix_arg(args: tuple, kwargs: Mapping[str, Any]) -> Tensor | None:
    candidate = args[0] if args else kwargs.get("A", kwargs.get("input"))
    if isinstance(candidate, Tensor) and candidate.dim() >= 2 and (
            candidate.is_floating_point() or candidate.is_complex()):
        return candidate
    return None


def _complex_gap_stats(w: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """Gap statistics of unordered complex eigenvalues (..., n): the eig backward divides by w_j - w_i."""
    n = w.shape[-1]
    w = w.detach().to(torch.complex128)
    dist = (w.unsqueeze(-1) - w.unsqueeze(-2)).abs()
    off = ~torch.eye(n, dtype=torch.bool, device=w.device)
    min_gap = torch.where(off, dist, torch.full_like(dist, math.inf)).flatten(-2).amin(-1)
    if n == 1:
        min_gap = torch.full_like(min_gap, math.nan)
    # Largest number of eigenvalues within the tie tolerance of one of them (unordered: no chains).
    near = (dist <= tie_tol(n, dtype, w.abs().amax(-1))[..., None, None]).sum(-1)
    size, centre = near.max(-1)
    value = w.abs().gather(-1, centre.unsqueeze(-1)).squeeze(-1)
    return {"min_gap": min_gap, "amplification": 1.0 / min_gap, "max_cluster": size.to(torch.float64),
            "cluster_value": torch.where(size > 1, value, torch.full_like(value, math.nan))}


def _general_stats(A: Tensor, k) -> dict[str, Tensor]:
    """Singular-value statistics of general (..., m, n) matrices; NaN for matrices with non-finite entries."""
    finite = torch.isfinite(A).all(-1).all(-1)
    safe = torch.where(finite[..., None, None], A, torch.zeros_like(A))
    stats = singular_stats(torch.linalg.svdvals(safe), k=k, dtype=A.dtype)
    return {key: torch.where(finite, value, torch.full_like(value, math.nan)) if key != "n" else value
            for key, value in stats.items()}


def _nan_like(flat: Tensor) -> Tensor:
    return torch.full(flat.shape[:-2], math.nan, dtype=torch.float64, device=flat.device)


def _spectrum_stats(kind: str, flat: Tensor, out: Any, k) -> dict[str, Tensor]:
    """STAT_KEYS of the (b, m, n) input ``flat`` of an op of this kind; ``out`` is None if the op raised."""
    b, dtype = flat.shape[0], flat.dtype
    if kind in ("eigh", "eigvalsh") and out is not None:
        ev = (out[0] if kind == "eigh" else out).detach()
        stats = eigen_stats(ev.reshape(-1, ev.shape[-1])[:b], k=k, dtype=dtype)
    elif kind in _HERMITIAN_KINDS:
        return matrix_stats(flat, k=k)
    elif kind in ("svd", "svd_old", "svdvals") and out is not None:
        s = (out if kind == "svdvals" else out[1]).detach()
        stats = singular_stats(s.reshape(-1, s.shape[-1])[:b], k=k, dtype=dtype)
    else:
        stats = _general_stats(flat, k)
        if kind in ("eig", "eigvals") and out is not None:
            w = out[0] if kind == "eig" else out
            stats.update(_complex_gap_stats(w.reshape(-1, w.shape[-1])[:b], dtype))
            # Complex eigenvalues have no order, so no signal/noise split.
            stats.update({key: _nan_like(flat) for key in ("gap_split", "min_gap_signal", "min_gap_noise")})
    stats["herm_err"] = hermitian_error(flat) if kind in _HERMITIAN_KINDS else _nan_like(flat)
    return {key: stats[key] for key in STAT_KEYS}


def _marked_entry(func: Callable) -> tuple[str, str] | None:
    """Functions outside torch that declare ``__spectral_op__ = "eigh"`` (e.g. a custom eigh with its own
    backward) are probed like torch's op of that kind, under their own name."""
    kind = getattr(func, "__spectral_op__", None)
    if kind not in _MARKED_KINDS:
        return None
    return (getattr(func, "__name__", kind), kind)


_MARKED_KINDS = frozenset({"eigh", "eigvalsh", "svd", "svdvals", "herm", "general"})


class _LinalgMode(TorchFunctionMode):
    """Passes every call through unchanged; hands allow-listed linalg calls to the probe."""

    def __init__(self, probe: SpectralProbe):
        super().__init__()
        self._probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        entry = OPS.get(func) or _marked_entry(func)
        probe = self._probe
        if entry is None or not probe.sampling or probe._busy:
            return func(*args, **kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception:
            # The input that made the op fail (e.g. an indefinite matrix in cholesky) is the finding.
            probe._record(entry, args, kwargs, None)
            raise
        probe._record(entry, args, kwargs, out)
        return out


class SpectralProbe:
    """Context manager recording spectral statistics of linalg call sites and watched matrices.

    ``roots``: named modules whose dotted submodule paths name the call sites (``{"model": m}`` gives
    ``model.encoder.layers.0``); a module outside the roots is named by its class, after its nearest
    named ancestor. ``every``: record only on steps with ``step % every == 0`` (see :meth:`step`).
    ``max_matrices``: record only the first k matrices of a batch.
    """

    def __init__(self, roots: Mapping[str, nn.Module] | None = None, every: int = 1,
                 max_matrices: int | None = None):
        if every < 1 or (max_matrices is not None and max_matrices < 1):
            raise SettingError(f"SpectralProbe: every={every} and max_matrices={max_matrices} must be >= 1 "
                               "(max_matrices=None records whole batches)")
        self.roots = dict(roots or {})
        self.every, self.max_matrices = every, max_matrices
        self._step, self.sampling, self._busy = 0, True, False
        self._signal_dim: Tensor | int | None = None
        self._sites: dict[tuple[str, str, str], _Site] = {}
        self._paths: dict[int, str] = {}
        self._stack: list[nn.Module] = []
        self._handles: list[Any] = []
        self._mode: _LinalgMode | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> SpectralProbe:
        if self._mode is not None:
            raise ProbeError("SpectralProbe is already active; leave its `with` block before re-entering it")
        self._paths = {id(module): f"{root}.{name}".strip(".")
                       for root, top in reversed(list(self.roots.items()))
                       for name, module in reversed(list(top.named_modules()))}
        self._handles = [register_module_forward_pre_hook(self._enter_module),
                         register_module_forward_hook(self._leave_module, always_call=True)]
        try:
            self._mode = _LinalgMode(self)
            self._mode.__enter__()
        except BaseException:
            self._mode = None
            self._remove_hooks()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        mode, self._mode = self._mode, None
        try:
            if mode is not None:
                mode.__exit__(exc_type, exc, tb)
        finally:
            self._remove_hooks()
            self._stack.clear()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        return self._mode is not None

    # -- configuration per step -------------------------------------------------------------------
    def step(self, i: int) -> None:
        """Set the current step; records are taken only when ``i % every == 0``."""
        self._step = i
        self.sampling = i % self.every == 0

    def set_signal_dim(self, k: Tensor | int | None) -> None:
        """Signal dimension for the split gaps: an int for every call, a per-sample tensor applied to the
        calls whose batch shape equals its shape, or None (unknown)."""
        self._signal_dim = k.detach() if isinstance(k, Tensor) else k

    def _k_for(self, batch_shape: torch.Size, b: int, k: Tensor | int | None = None):
        k = self._signal_dim if k is None else k
        if not isinstance(k, Tensor):
            return k
        if tuple(k.shape) != tuple(batch_shape):
            return None
        return k.reshape(-1)[:b]

    # -- module paths ----------------------------------------------------------------------------
    def _enter_module(self, module: nn.Module, args: Any) -> None:
        self._stack.append(module)

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._stack
        if any(entry is module for entry in stack):
            while stack.pop() is not module:
                pass

    def module_path(self) -> str:
        """Dotted path of the innermost running module ("" outside every module)."""
        stack = self._stack
        for depth in range(len(stack) - 1, -1, -1):
            path = self._paths.get(id(stack[depth]))
            if path is not None:
                inner = "" if depth == len(stack) - 1 else "." + type(stack[-1]).__name__
                return path + inner
        return type(stack[-1]).__name__ if stack else ""

    # -- recording -------------------------------------------------------------------------------
    def _site(self, key: tuple[str, str, str], name: str, op: str, location: str, module: str) -> _Site:
        site = self._sites.get(key)
        if site is None:
            taken = {other.name for other in self._sites.values()}
            # A second call site of the same op in the same module keeps its own record.
            site = _Site(name if name not in taken else f"{name}@{location}", op, location, module)
            self._sites[key] = site
        return site

    def _flatten(self, matrices: Tensor) -> Tensor:
        flat = matrices.detach().reshape(-1, *matrices.shape[-2:])
        return flat if self.max_matrices is None else flat[: self.max_matrices]

    def _measure(self, compute: Callable[[], dict[str, Tensor]], flat: Tensor, what: str) -> dict[str, Tensor]:
        self._busy = True  # our own linalg calls must not be recorded
        try:
            with torch.no_grad():
                return compute()
        except torch.linalg.LinAlgError as err:
            log.warning("SpectralProbe: statistics of %s could not be computed (%s); recorded as NaN", what, err)
            nan = _nan_like(flat)
            return {key: torch.full_like(nan, float(flat.shape[-1])) if key == "n" else nan for key in STAT_KEYS}
        finally:
            self._busy = False

    def _record(self, entry: tuple[str, str], args: tuple, kwargs: Mapping[str, Any], out: Any) -> None:
        matrices = _matrix_arg(args, kwargs)
        if matrices is None:
            return
        op, kind = entry
        module, location = self.module_path(), caller_location()
        site = self._site((module, op, location), f"{module}:{op}" if module else op, op, location, module)
        flat = self._flatten(matrices)
        k = self._k_for(matrices.shape[:-2], flat.shape[0])
        stats = self._measure(lambda: _spectrum_stats(kind, flat, out, k), flat, site.name)
        site.add(stats, matrices.requires_grad)
        for index in _VECTOR_OUTPUTS.get(kind, ()) if out is not None else ():
            if out[index].requires_grad:
                out[index].register_hook(site.vector_hook())

    def watch(self, name: str, tensor: Tensor, k: Tensor | int | None = None) -> None:
        """Record the statistics of square matrices ``(..., n, n)`` that do not pass through linalg
        (eigenvalues of the Hermitian part, plus herm_err). ``k`` overrides the signal dimension.
        Works inside or outside the ``with`` block; honours ``every`` and ``max_matrices``."""
        if not isinstance(tensor, Tensor) or tensor.dim() < 2 or tensor.shape[-1] != tensor.shape[-2]:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ProbeError(f"SpectralProbe.watch('{name}'): expected square matrices (..., n, n), got {shape}; "
                             "watch the covariance itself, not its factors")
        if not self.sampling:
            return
        site = self._site(("<watch>", name, ""), name, "watch", caller_location(), self.module_path())
        flat = self._flatten(tensor)
        kk = self._k_for(tensor.shape[:-2], flat.shape[0], k)
        site.add(self._measure(lambda: matrix_stats(flat, k=kk), flat, name), tensor.requires_grad)

    def collect(self) -> dict[str, dict[str, Any]]:
        """Worst-over-the-sampled-batch statistics of every site recorded since the last collect, with
        one device sync; resets the records. Call it after backward so ``vec_grad`` is known."""
        active = [site for site in self._sites.values() if site.calls]
        tensors: dict[str, Tensor] = {}
        for i, site in enumerate(active):
            tensors.update({f"{i}/{key}": value for key, value in site.reduced().items()})
            if site.vec is not None:
                tensors[f"{i}/vec_grad"] = site.vec
        floats = to_floats(tensors)
        result = {
            site.name: {"site": site.name, "op": site.op, "location": site.location, "module": site.module,
                        "requires_grad": site.requires_grad, "vec_grad": bool(floats.get(f"{i}/vec_grad", 0.0)),
                        "stats": {key: floats[f"{i}/{key}"] for key in STAT_KEYS}, "calls": site.calls}
            for i, site in enumerate(active)
        }
        for site in active:
            site.reset()
        return result
