"""SpectralProbe: zero-touch spectral statistics of every linear-algebra call a model makes.

While active, the probe observes the linear-algebra entry points only (eigh, eigvalsh, svd, svdvals,
cholesky, inv, solve, lstsq, qr, eig, pinv and their old aliases; see ``ris_stability.observe.intercept``, which
swaps thin wrappers in for them and puts the originals back on exit): every other torch call runs
untouched. For each call site it records the statistics of the input matrix (reusing the eigenvalues /
singular values the op returned when it computes them; ``ris_stability.linalg.site_stats``), whether the input
requires grad, and whether the op's eigenvectors (U/V for svd) actually RECEIVE gradient in backward: a
hook on those outputs sets a device flag when the incoming gradient is non-zero, so eigenvector hazards
(tied gaps) are flagged only where the loss really uses the vectors. The call site is named by the module
running it (``ris_stability.observe.tracker``, read from the Python stack when a call is recorded) and the
user's source line.

The probe never changes results: the intercepted op runs exactly as called, statistics are computed on
detached inputs under no_grad, the vector hooks return None, and nothing syncs with the device until
:meth:`SpectralProbe.collect` (one transfer for every site), or not at all with
:meth:`SpectralProbe.collect_async`.

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
import threading
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ris_stability.observe import intercept

from ris_stability.linalg import registry
from ris_stability.linalg.norms import refine
from ris_stability.observe.frames import caller_location, user_stack
from ris_stability.numerics.stats import STAT_KEYS, worst_rows, worst_segments
from ris_stability.records.schema import SettingError
from ris_stability.linalg.site_stats import (KINDS, NOT_BATCHABLE, batch_parts, batched_rows, leading_rows, nan_rows,
                                             stat_rows)
from ris_stability.linalg.site_grads import BackwardRecord
from ris_stability.observe.tracker import ModuleTracker

log = logging.getLogger(__name__)

# The torch callables observed, as (name, kind): for instruments that see calls through a TorchFunctionMode.
# Norms are spectral only for some orders (linalg.norms.refine): not an allow-listed matrix consumer.
OPS: dict[Callable, tuple[str, str]] = {func: (entry.name, entry.kind)
                                        for func, entry in registry.entry_by_function().items()
                                        if entry.kind != "norm"}

EIG_TERM_KEYS = ("phase_noise", "gap_terms")
_COMPACT_AFTER = 16  # per-site batches kept before they are reduced to one worst case on the device
_WATCH_KIND = "herm"


class ProbeError(ValueError):
    """The probe was used in a way that cannot produce meaningful records."""


@dataclass
class _Site:
    """Accumulated records of one call site between two collect() calls: rows (b, len(STAT_KEYS))."""
    name: str
    op: str
    location: str
    module: str
    calls: int = 0
    requires_grad: bool = False
    chunks: list[Tensor] = field(default_factory=list)
    # What backward handed the site's hooks: vec_grad, the site's contribution, eig backward terms.
    grads: BackwardRecord = field(default_factory=BackwardRecord)
    deferred: list[tuple[str, Tensor, Any, Any]] = field(default_factory=list)  # calls not measured yet

    def add(self, rows: Tensor, requires_grad: bool) -> None:
        self.calls += 1
        self.requires_grad = self.requires_grad or requires_grad
        self._append(rows)

    def _append(self, rows: Tensor) -> None:
        self.chunks.append(rows)
        if len(self.chunks) >= _COMPACT_AFTER:
            self.chunks = [self.reduced().unsqueeze(0)]

    def defer(self, call: tuple[str, Tensor, Any, Any], requires_grad: bool) -> None:
        """Keep a call to be measured together with the site's other calls (:meth:`flush`)."""
        self.calls += 1
        self.requires_grad = self.requires_grad or requires_grad
        self.deferred.append(call)

    def flush(self, measure: Callable[[Callable[[], Tensor], Tensor, str], Tensor]) -> None:
        """Measure the deferred calls, one batched computation per group of alike calls."""
        calls, self.deferred = self.deferred, []
        for kind, flat, parts, k in batched_rows(calls):
            self._append(measure(lambda: stat_rows(kind, flat, parts, k), flat, self.name))

    def reduced(self) -> Tensor:
        return worst_rows(self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks))

    def reset(self) -> None:
        self.calls, self.requires_grad, self.chunks, self.deferred = 0, False, [], []
        self.grads = BackwardRecord()


def _grad_node(out: Any):
    """The autograd node of the op's first output (None when it does not require grad)."""
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    return first.grad_fn if isinstance(first, Tensor) else None


def _matrix_arg(args: tuple, kwargs: Mapping[str, Any]) -> Tensor | None:
    candidate = args[0] if args else kwargs.get("A", kwargs.get("input"))
    if isinstance(candidate, Tensor) and candidate.dim() >= 2 and (
            candidate.is_floating_point() or candidate.is_complex()):
        return candidate
    return None


class SpectralProbe:
    """Context manager recording spectral statistics of linalg call sites and watched matrices.

    ``roots``: named modules whose dotted submodule paths name the call sites (``{"model": m}`` gives
    ``model.encoder.layers.0``); other modules are named by the tracker's rule (ris_stability.observe.tracker).
    ``every``: record only on steps with ``step % every == 0`` (see :meth:`step`).
    ``max_matrices``: record only the first k matrices of a batch. ``batch_calls``: measure the calls of
    one site together (at collect, or every 16 calls) instead of one by one: a per-sample Python loop then
    costs one batched computation per step, not a dozen small kernels per sample.
    """

    def __init__(self, roots: Mapping[str, nn.Module] | None = None, every: int = 1,
                 max_matrices: int | None = None, batch_calls: bool = True):
        if every < 1 or (max_matrices is not None and max_matrices < 1):
            raise SettingError(f"SpectralProbe: every={every} and max_matrices={max_matrices} must be >= 1 "
                               "(max_matrices=None records whole batches)")
        self.roots = dict(roots or {})
        self.every, self.max_matrices = every, max_matrices
        # Many small calls of one site (a per-sample loop) are measured together at collect time.
        self.batch_calls = batch_calls
        self._step, self.sampling, self._active = 0, True, False
        self.thread = threading.get_ident()
        self._signal_dim: Tensor | int | None = None
        self._sites: dict[tuple[str, str, str], _Site] = {}
        self._tracker: ModuleTracker | None = None
        # Vector outputs of autograd Functions: they require grad only once the Function has returned.
        self._pending: list[tuple[_Site, Tensor]] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> SpectralProbe:
        if self._active:
            raise ProbeError("SpectralProbe is already active; leave its `with` block before re-entering it")
        if self._tracker is None or not self._tracker.same_roots(self.roots):
            self._tracker = ModuleTracker(self.roots)
        self.thread = threading.get_ident()
        intercept.register(self)
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._active = False
        intercept.unregister(self)

    @property
    def active(self) -> bool:
        return self._active

    # -- the intercept.Listener protocol ----------------------------------------------------------
    def accepts(self) -> bool:
        return self.sampling

    def on_call(self, name: str, kind: str, args: tuple, kwargs: dict, out: Any, frame: FrameType | None) -> None:
        self.before_backward()
        refined = refine(name, kind, args, kwargs)
        if refined is None:
            return
        name, kind = refined
        matrices = _matrix_arg(args, kwargs)
        if matrices is None or kind not in KINDS:
            return
        module = self._tracker.current(frame) if self._tracker is not None else ""
        stack = user_stack(frame, limit=1)
        location = stack[0] if stack else "<unknown>"
        shape = tuple(matrices.shape[-2:])
        site = self._site((module, name, location, shape), f"{module}:{name}" if module else name, name, location,
                          module)
        # Ops that return their spectrum are measured on the whole batch (O(b n) from the values they
        # computed), so the worst sample is found wherever it sits; max_matrices bounds the others.
        flat = self._flatten(matrices, whole=out is not None and kind in registry.SPECTRUM_KINDS)
        k = self._k_for(matrices.shape[:-2], flat.shape[0])
        parts = batch_parts(kind, out, matrices.dim() - 2, flat.shape[0]) if self.batch_calls else NOT_BATCHABLE
        if parts is NOT_BATCHABLE or isinstance(k, Tensor):
            site.add(self._measure(lambda: stat_rows(kind, flat, out, k), flat, site.name), matrices.requires_grad)
        else:
            # A copy: the caller may overwrite its matrix in place before the deferred measurement.
            site.defer((kind, flat.clone(), parts, k), matrices.requires_grad)
            if len(site.deferred) >= _COMPACT_AFTER:  # bounded memory: at most this many inputs kept
                site.flush(self._measure)
        node = _grad_node(out)
        if node is not None:
            node.register_hook(site.grads.backward_hook(matrices.detach()))
        if kind == "eig" and out is not None and out[1].requires_grad:
            n, b = matrices.shape[-1], flat.shape[0]
            w, V = out[0].detach().reshape(-1, n)[:b], out[1].detach().reshape(-1, n, n)[:b]
            out[1].register_hook(site.grads.eig_hook(w, V))
        for index in KINDS[kind].vector_outputs if out is not None else ():
            vectors = out[index]
            if vectors.requires_grad:
                vectors.register_hook(site.grads.vector_hook())
            elif matrices.requires_grad:
                # A strong reference until the next call or backward: the Python object made inside an autograd
                # Function's forward is not always kept alive by its caller (a weakref then sees it die, and the
                # eigenvector use of a custom eigh such as eigh_gap_aware would read "no").
                self._pending.append((site, vectors))

    def before_backward(self) -> None:
        """Hook the vector outputs that came out of autograd Functions (called by intercept before every
        backward; call it yourself before a backward that does not go through torch.autograd)."""
        pending, self._pending = self._pending, []
        for site, vectors in pending:
            if vectors.requires_grad:
                vectors.register_hook(site.grads.vector_hook())

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

    def module_path(self) -> str:
        """Name of the innermost running module ("" outside every module), by the tracker's rule."""
        tracker = self._tracker or ModuleTracker(self.roots)
        return tracker.current()

    # -- recording -------------------------------------------------------------------------------
    def _site(self, key: tuple, name: str, op: str, location: str, module: str) -> _Site:
        site = self._sites.get(key)
        if site is None:
            taken = {other.name: k for k, other in self._sites.items()}
            if name in taken:
                # A second call site of the same op in the same module keeps its own record, and so does a
                # second matrix shape at one call site ((144, k) and (k, k) statistics do not mix).
                shape = "x".join(str(d) for d in key[-1]) if len(key) > 3 else ""
                same_line = len(key) > 3 and taken[name][:3] == key[:3]
                name = f"{name}[{shape}]" if same_line else f"{name}@{location}"
                name = name if name not in taken else f"{name}@{location}[{shape}]"
            site = _Site(name, op, location, module)
            self._sites[key] = site
        return site

    def _flatten(self, matrices: Tensor, whole: bool = False) -> Tensor:
        return leading_rows(matrices, 2, None if whole else self.max_matrices)

    def _measure(self, compute: Callable[[], Tensor], flat: Tensor, what: str) -> Tensor:
        try:
            with torch.no_grad(), intercept.quiet():  # our own linalg calls must not be recorded
                return compute()
        except torch.linalg.LinAlgError as err:
            log.warning("SpectralProbe: statistics of %s could not be computed (%s); recorded as NaN", what, err)
            nan = nan_rows(flat)
            return torch.stack([torch.full_like(nan, float(flat.shape[-1])) if key == "n" else nan
                                for key in STAT_KEYS], dim=-1)

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
        site.add(self._measure(lambda: stat_rows(_WATCH_KIND, flat, None, kk), flat, name), tensor.requires_grad)

    def _reduce(self) -> tuple[list[_Site], Tensor | None]:
        """The sites recorded since the last collect and their worst statistics (S, K+4) on the device,
        then vec_grad (0/1), the norm of the gradient the calls passed back (NaN if none) and the eig
        backward's phase noise and gap terms (NaN if not an eig site); the records are reset."""
        active = [site for site in self._sites.values() if site.calls]
        if not active:
            return [], None
        for site in active:
            site.flush(self._measure)
            site.grads.settle()
        # One segmented reduction over the rows of every site: a fixed number of kernels per collect.
        chunks = [chunk for site in active for chunk in site.chunks]
        rows = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        device = rows.device
        if rows.shape[0] == len(active):  # one row per site, in site order: no segment ids to build
            segment = None
        else:
            segment = torch.cat([torch.full((chunk.shape[0],), i, dtype=torch.long, device=device)
                                 for i, site in enumerate(active) for chunk in site.chunks])
        worst = worst_segments(rows, segment, len(active))
        zero = torch.zeros((), dtype=torch.float64, device=device)
        nan = torch.full((), float("nan"), dtype=torch.float64, device=device)
        extra = torch.stack([value for site in active for value in (
            zero if site.grads.vec is None else site.grads.vec.to(device, torch.float64),
            nan if site.grads.back is None else site.grads.back.to(device).sqrt(),
            *[site.grads.eig_terms.get(key, nan).to(device).reshape(()) for key in EIG_TERM_KEYS])])
        table = torch.cat([worst, extra.view(len(active), 2 + len(EIG_TERM_KEYS))], dim=1)
        infos = [_Site(site.name, site.op, site.location, site.module, site.calls, site.requires_grad)
                 for site in active]
        for site in active:
            site.reset()
        return infos, table

    def collect(self) -> dict[str, dict[str, Any]]:
        """Worst-over-the-sampled-batch statistics of every site recorded since the last collect, with
        one device sync; resets the records. Call it after backward so ``vec_grad`` is known."""
        self._pending = []
        sites, table = self._reduce()
        return _records(sites, table.tolist() if table is not None else [])

    def collect_later(self) -> tuple[Tensor | None, Callable[[list[float]], dict[str, dict[str, Any]]]]:
        """Like :meth:`collect` for a caller that reads many instruments at once: the statistics table on the
        device (None: no site) and the function that turns its numbers (flattened) into the records."""
        self._pending = []
        sites, table = self._reduce()
        if table is None:
            return None, lambda values: {}
        width = table.shape[1]
        return table, lambda values: _records(sites, [values[i:i + width] for i in range(0, len(values), width)])

    def collect_async(self) -> Callable[[], dict[str, dict[str, Any]]]:
        """Like :meth:`collect` without waiting for the device: the statistics are copied to host memory
        in the background; the returned function gives the records (waiting only if the copy is not done).
        Call it when the device has moved on, e.g. at the next logged step."""
        self._pending = []
        sites, table = self._reduce()
        if table is None:
            return lambda: {}
        if table.device.type == "cpu":
            values = table.tolist()
            return lambda: _records(sites, values)
        host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
        host.copy_(table, non_blocking=True)
        done = torch.cuda.Event() if table.device.type == "cuda" else None
        if done is not None:
            done.record()

        def result() -> dict[str, dict[str, Any]]:
            if done is not None:
                done.synchronize()
            return _records(sites, host.tolist())
        return result


def _records(sites: list[_Site], values: list[list[float]]) -> dict[str, dict[str, Any]]:
    return {
        site.name: {"site": site.name, "op": site.op, "location": site.location, "module": site.module,
                    "requires_grad": site.requires_grad, "vec_grad": bool(row[len(STAT_KEYS)]),
                    "stats": dict(zip(STAT_KEYS, row)), "calls": site.calls, "grad_norm": row[len(STAT_KEYS) + 1],
                    "backward": dict(zip(EIG_TERM_KEYS, row[len(STAT_KEYS) + 2:]))}
        for site, row in zip(sites, values)
    }
