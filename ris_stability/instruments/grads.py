"""Gradient monitor: per-module grad norms, update ratios, non-finite counts, dead parameters and terms.

Everything stays on the device between observations; :meth:`GradMonitor.collect`,
:meth:`GradMonitor.dead_parameters` and :meth:`GradMonitor.dead_terms` each sync once.

Typical loop::

    gm = GradMonitor(model, depth=1, dead_after=50)
    loss, terms = loss_fn(...); loss.backward()
    gm.observe_grads(optimizer); gm.observe_terms(terms)
    gm.before_step(optimizer); optimizer.step(); gm.after_step(optimizer)   # sampled steps only
    gm.settle(ok)   # optional: ok=False drops this step's liveness (a skipped or non-finite step)
    row.update(gm.collect()); warn(gm.dead_parameters(), gm.dead_terms())
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ris_stability.instruments.grad_block import TOTAL_KEY, as_list, group_key, module_key, segments
from ris_stability.instruments.grad_norms import grad_norms, per_param, present_grads
from ris_stability.numerics.norms import fast_norms, float64_norms
from ris_stability.numerics.stats import to_floats

log = logging.getLogger(__name__)

class GradMonitorError(RuntimeError):
    """The monitor was called out of order or with an object it cannot measure."""


def nonfinite_counts(params: Sequence[nn.Parameter], device: torch.device,
                     index_cache: dict | None = None) -> Tensor:
    """Number of non-finite grad elements of each parameter, (P,) int64 on ``device``."""
    grads = present_grads(params)
    # g * 0 is 0 where g is finite and NaN where it is not; its "L0 norm" counts the non-zero (NaN) entries.
    counts = torch._foreach_norm(torch._foreach_mul(grads, 0.0), 0) if grads else ()
    return per_param(params, counts, device, torch.long, index_cache)


@dataclass
class _Term:
    first: Tensor
    varied: Tensor  # device bool: some observation differed from the first
    count: int = 0
    last: Tensor | None = None


class GradMonitor:
    """Stateful tracker of gradient health for one model (see module docstring for the call order).

    ``depth``: module-tree depth at which grad norms are grouped. ``dead_after``: number of
    observations after which a parameter that never received a non-zero finite gradient, or a loss
    term that never changed, is reported (once) by name.
    """

    def __init__(self, model: nn.Module, depth: int = 1, dead_after: int = 50):
        if depth < 1 or dead_after < 1:
            raise GradMonitorError(f"GradMonitor: depth={depth} and dead_after={dead_after} must be >= 1")
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise GradMonitorError(f"GradMonitor: {type(model).__name__} has no trainable parameters to monitor")
        self.depth, self.dead_after = depth, dead_after
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.device = self.params[0].device
        keys = [module_key(name, depth) for name in self.names]
        self.modules = list(dict.fromkeys(keys))
        self._module_of = [self.modules.index(k) for k in keys]
        self._module_index = torch.tensor(self._module_of, device=self.device)
        self._segment_cache: dict[tuple[tuple[int, ...], ...], tuple[Tensor, Tensor, int]] = {}
        self._update_cache: dict[tuple[int, ...], tuple[Tensor | None, Tensor] | None] = {}  # _update_index
        self._grad_keys = [f"grad/{module}" for module in self.modules] + [f"grad/{TOTAL_KEY}"]
        self._param_keys = [f"param/{module}" for module in self.modules] + [f"param/{TOTAL_KEY}"]
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._present_indices: dict[tuple[int, ...], Tensor] = {}
        self._alive = torch.zeros(len(self.params), dtype=torch.bool, device=self.device)
        self._had_grad = [False] * len(self.params)
        self._liveness: tuple[Tensor, list[bool]] | None = None
        self.last_norms: Tensor | None = None  # float64 grad norms of the last observe_grads
        self._observed = 0
        self._pending: dict[str, Tensor] = {}
        self._block: tuple[list[str], Tensor] | None = None  # (keys, values + finite flag) of observe_grads
        self._block_floats: list[float] | None = None
        self._exact = False
        self._observed_with: tuple[Any, float] = (None, 1.0)
        self._snapshot: list[list[Tensor]] | None = None
        self._terms: dict[str, _Term] = {}
        self._reported_params: set[str] = set()
        self._reported_terms: set[str] = set()  # reported dead, or seen to change after dead_after

    # -- gradients ---------------------------------------------------------------------------------
    def observe_grads(self, optimizer: Any = None, count_nonfinite: bool = True, scale: Any = 1.0) -> None:
        """Measure the current grads (call after backward): module and total norms, per-param-group norms
        when ``optimizer`` (one or a sequence; several name their groups "<k>.<group>") is given, parameter
        liveness, and non-finite counts unless ``count_nonfinite`` is False (a caller that checks
        ``grad/_total`` for finiteness anyway can count only on a bad step with :meth:`count_nonfinite`).
        ``scale``: the factor the grads still carry (a GradScaler's scale before ``unscale_``), divided out.
        The liveness of this observation counts once the next observation is taken, unless
        :meth:`settle` (False) drops it first: a skipped or non-finite step says nothing about liveness."""
        self._commit()
        self._observed_with = (optimizer, scale)
        self._measure(exact=False)
        if count_nonfinite:
            self.count_nonfinite()

    def _measure(self, exact: bool) -> None:
        """The block of norms (float32 accumulation unless ``exact``: float64) and the liveness."""
        optimizer, scale = self._observed_with
        norms = grad_norms(self.params, self.device, self._present_indices, exact=exact)
        if isinstance(scale, Tensor) or scale != 1.0:  # a tensor scale: divided on the device, not read
            norms = norms / scale
        keys = list(self._grad_keys)
        opts = as_list(optimizer)
        layout = []
        for k, opt in enumerate(opts):
            for g, group in enumerate(opt.param_groups):
                keys.append(f"grad_group/{group_key(k, g, group, len(opts))}")
                layout.append(tuple(id(p) for p in group["params"]))
        # Parameter norms per module ride in the same read-back: the explosion checks compare the update
        # with them before the optimizer steps and trace a crash back to the update that grew them.
        with torch.no_grad():  # the parameters themselves, no graph (not a detached view of each)
            weights = torch.stack([n if n.device == self.device else n.to(self.device)
                                   for n in fast_norms(self.params)]).to(norms.dtype)
        keys += self._param_keys
        # Every sum of squares of the block (gradient norms per module, in total, per param group; parameter
        # norms per module and in total) in one scatter-add: a fixed handful of kernels whatever the groups.
        source, slots, size = self._segments(tuple(layout))
        squares = torch.cat([norms, weights]).square()
        sums = torch.zeros(size, dtype=norms.dtype, device=norms.device).index_add_(0, slots, squares[source]).sqrt()
        finite = torch.isfinite(norms)
        # One vector per observation, read back once (peek_norms / collect / grads_finite share it); the
        # last entry is 1 when every norm is finite.
        self._block = (keys, torch.cat([sums, finite.all().to(norms.dtype).reshape(1)]))
        self._block_floats, self._exact = None, exact
        # A NaN or inf norm is not a usable gradient; a zero norm means no gradient reached the parameter.
        self._liveness = (finite & (norms > 0), [p.grad is not None for p in self.params])
        self.last_norms = norms

    def _segments(self, layout: tuple[tuple[int, ...], ...]) -> tuple[Tensor, Tensor, int]:
        """The block's scatter-add for these param groups (grad_block.segments), cached: its index tensors are
        host-to-device copies."""
        cached = self._segment_cache.get(layout)
        if cached is None:
            if len(self._segment_cache) >= 8:  # param groups rebuilt again and again: keep only the latest
                self._segment_cache.clear()
            cached = self._segment_cache[layout] = segments(self._module_of, len(self.modules), self._position,
                                                            layout, self.device)
        return cached

    def _block_values(self) -> dict[str, float]:
        if self._block is None:
            return {}
        if self._block_floats is None:
            self._block_floats = self._block[1].tolist()
            if self._block_floats[-1] != 1.0 and not self._exact:
                # A float32 norm is inf for a NaN/Inf element but also for finite elements beyond ~1e19:
                # only float64 norms tell them apart (the rare bad step pays a second pass).
                self._measure(exact=True)
                self._block_floats = self._block[1].tolist()
        return dict(zip(self._block[0], self._block_floats))

    def block(self) -> Tensor | None:
        """The last observe_grads' values on the device (norms, then the all-finite flag), for a caller that
        reads it together with other values (:meth:`take_block` gives the numbers back)."""
        return None if self._block is None else self._block[1]

    def take_block(self, values: list[float]) -> None:
        """The numbers of :meth:`block`, read by the caller: peek_norms, grads_finite and collect use them."""
        self._block_floats = values
        if values and values[-1] != 1.0 and not self._exact:  # a bad step: the float64 pass tells inf from overflow
            self._measure(exact=True)
            self._block_floats = self._block[1].tolist()

    def grads_finite(self) -> bool | None:
        """Whether every gradient of the last observe_grads was finite (None before any); shares the one
        read-back of that observation with peek_norms and collect."""
        if self._block is None:
            return None
        self._block_values()
        return self._block_floats[-1] == 1.0

    def _commit(self) -> None:
        if self._liveness is not None:
            alive, present = self._liveness
            self._alive |= alive
            self._had_grad = [a or b for a, b in zip(self._had_grad, present)]
            self._observed += 1
            self._liveness = None

    def settle(self, ok: bool) -> None:
        """Count the last observation's liveness now (``ok``) or drop it (a skipped / non-finite step)."""
        if ok:
            self._commit()
        self._liveness = None

    def nonfinite_parameters(self) -> list[str]:
        """Names of the parameters whose current grad holds NaN/Inf (one sync; for bad steps only)."""
        counts = nonfinite_counts(self.params, self.device, self._present_indices).tolist()
        return [name for name, c in zip(self.names, counts) if c > 0]

    def never_had_grad(self, name: str) -> bool:
        """True when the parameter's grad was None at every counted observation (not reached by the loss)."""
        return not self._had_grad[self.names.index(name)]

    def peek_norms(self) -> dict[str, float]:
        """The module and total grad norms measured by the last observe_grads, as floats (one sync),
        keyed by module (``_total`` for the total); they stay pending for collect."""
        return {k[len("grad/"):]: v for k, v in self._block_values().items() if k.startswith("grad/")}

    def peek_block(self, prefix: str) -> dict[str, float]:
        """The values of the last observe_grads whose keys start with ``prefix`` (``"param/"``: parameter norms
        per module before the update, ``"grad_group/"``: per param group), prefix removed; the same read-back
        as peek_norms."""
        return {k[len(prefix):]: v for k, v in self._block_values().items() if k.startswith(prefix)}

    def param_norms(self) -> dict[str, float]:
        """The parameters' norms now, per module and in total (``_total``); one sync (for a bad step or a crash)."""
        weights = torch.stack([n.to(self.device, torch.float64) for n in float64_norms([p.detach() for p in self.params])])
        wsq = weights.square()
        by_module = torch.zeros(len(self.modules), dtype=wsq.dtype, device=self.device).index_add_(
            0, self._module_index, wsq).sqrt()
        return dict(zip(self.modules + [TOTAL_KEY], torch.cat([by_module, wsq.sum().sqrt().reshape(1)]).tolist()))

    def count_nonfinite(self) -> None:
        """Count the non-finite elements of the current grads per module (reported by collect when > 0)."""
        counts = nonfinite_counts(self.params, self.device, self._present_indices)
        nonfinite = torch.zeros(len(self.modules), dtype=torch.long, device=self.device)
        nonfinite.index_add_(0, self._module_index, counts)
        for i, module in enumerate(self.modules):
            self._pending[f"grad_nonfinite/{module}"] = nonfinite[i]

    def before_step(self, optimizer: Any) -> None:
        """Snapshot the parameters of every param group (call right before ``optimizer.step()``; one
        optimizer or a sequence)."""
        self._snapshot = [[p.detach().clone() for p in group["params"]]
                          for opt in as_list(optimizer) for group in opt.param_groups]

    @property
    def snapshot_taken(self) -> bool:
        """Whether before_step was called since the last after_step (a step the loop left early has none)."""
        return self._snapshot is not None

    def after_step(self, optimizer: Any) -> None:
        """Update ratio ||dtheta|| / ||theta|| against the snapshot of before_step: per module
        (``update_ratio/<module>``, grouped as the grad norms) and per param group (``update_ratio_group/<g>``)."""
        opts = as_list(optimizer)
        groups = [(group_key(k, g, group, len(opts)), group) for k, opt in enumerate(opts)
                  for g, group in enumerate(opt.param_groups)]
        if self._snapshot is None or len(self._snapshot) != len(groups):
            raise GradMonitorError("GradMonitor.after_step: no matching before_step snapshot; call "
                                   "before_step(optimizer) right before optimizer.step() on the same optimizer")
        d_mod = torch.zeros(len(self.modules), dtype=torch.float64, device=self.device)
        t_mod = torch.zeros_like(d_mod)
        for (key, group), before in zip(groups, self._snapshot):
            after = [p.detach() for p in group["params"]]
            if not after:
                continue
            delta = self._stacked(torch._foreach_norm(torch._foreach_sub(after, before))).square()
            theta = self._stacked(torch._foreach_norm(before)).square()
            self._pending[f"update_ratio_group/{key}"] = delta.sum().sqrt() / theta.sum().sqrt()
            where = self._update_index(tuple(id(p) for p in group["params"]))
            if where is not None:
                mine, at = where
                d_mod.index_add_(0, at, delta if mine is None else delta[mine])
                t_mod.index_add_(0, at, theta if mine is None else theta[mine])
        ratio = d_mod.sqrt() / t_mod.sqrt()
        for i, module in enumerate(self.modules):
            self._pending[f"update_ratio/{module}"] = ratio[i]
        self._snapshot = None

    def _stacked(self, norms: Sequence[Tensor]) -> Tensor:
        """0-d norms as one float64 vector on the monitor's device: one stack and one cast when they are all there
        already (a cast per norm otherwise: parameters spread over devices)."""
        if all(n.device == self.device for n in norms):
            return torch.stack(list(norms)).to(torch.float64)
        return torch.stack([n.to(self.device, torch.float64) for n in norms])

    def _update_index(self, ids: tuple[int, ...]) -> tuple[Tensor | None, Tensor] | None:
        """(positions in the group of its monitored parameters, None when all are; their module indices) for a
        param group's update ratios, cached: built from Python lists they are host-to-device copies, which a GPU
        waits for. None: no monitored parameter in the group."""
        if ids not in self._update_cache:
            if len(self._update_cache) >= 8:  # param groups rebuilt again and again: keep only the latest
                self._update_cache.clear()
            mine = [i for i, pid in enumerate(ids) if pid in self._position]
            self._update_cache[ids] = None if not mine else (
                None if len(mine) == len(ids) else torch.tensor(mine, dtype=torch.long, device=self.device),
                self._module_index[torch.tensor([self._position[ids[i]] for i in mine], dtype=torch.long,
                                                device=self.device)])
        return self._update_cache[ids]

    # -- loss terms --------------------------------------------------------------------------------
    def observe_terms(self, terms: Mapping[str, Tensor | float]) -> None:
        """Record each named loss term's value; a term equal to its first value (e.g. identically zero)
        over ``dead_after`` observations is reported by :meth:`dead_terms`."""
        for name, value in terms.items():
            v = torch.as_tensor(value).detach()
            state = self._terms.get(name)
            if state is None:
                state = self._terms[name] = _Term(first=v.clone(), varied=torch.zeros((), dtype=torch.bool,
                                                                                      device=v.device))
            elif v.shape != state.first.shape:
                state.varied = torch.ones_like(state.varied)
            else:
                # NaN != NaN, so a term that goes non-finite counts as changing (it is reported elsewhere).
                state.varied = state.varied | (v != state.first.to(v.device)).any().to(state.varied.device)
            state.count += 1
            state.last = v
            if v.numel() == 1:
                self._pending[f"loss/{name}"] = v.reshape(())

    # -- reports -----------------------------------------------------------------------------------
    def take_pending(self) -> tuple[dict[str, float], list[str], Tensor | None]:
        """What :meth:`collect` would return, split for a caller that reads once for many instruments: the
        block's numbers (already read), the keys of the values still on the device and those values as one
        vector (None when there are none); hand the numbers of that vector to :meth:`collect_from`. Clears."""
        floats = self._block_values()
        keys = list(self._pending)
        values = torch.stack([v.detach().reshape(()).to(self.device, torch.float64) for v in self._pending.values()]) \
            if keys else None
        self._pending, self._block, self._block_floats = {}, None, None
        return floats, keys, values

    def collect(self) -> dict[str, float]:
        """Everything measured since the last collect, as Python numbers (one device sync), then cleared.
        Keys: ``grad/<module>``, ``grad/_total``, ``grad_nonfinite/<module>`` (int, only when > 0),
        ``grad_group/<group>``, ``update_ratio/<module>``, ``update_ratio_group/<group>``, ``loss/<term>``."""
        floats = self._block_values()
        floats.update(to_floats(self._pending) if self._pending else {})
        self._pending, self._block, self._block_floats = {}, None, None
        return self.collect_from(floats, [], [])

    @staticmethod
    def collect_from(floats: dict[str, float], keys: list[str], values: list[float]) -> dict[str, float]:
        """The row of :meth:`take_pending`'s parts: the block's numbers and the device values' numbers."""
        floats = {**floats, **dict(zip(keys, values))}
        out: dict[str, float] = {}
        for key, value in floats.items():
            if key.startswith("grad_nonfinite/"):
                if value > 0:
                    out[key] = int(value)
            else:
                out[key] = value
        return out

    def dead_check(self) -> tuple[Tensor | None, list[str]]:
        """The device values :meth:`dead_parameters` and :meth:`dead_terms` need (liveness once enough
        observations were made, the ripe terms' change flags), for a caller that reads them with others;
        None: nothing to read. Returns (values, ripe term names)."""
        self._commit()
        parts = [self._alive.to(torch.float64)] if self._observed >= self.dead_after and \
            len(self._reported_params) < len(self.names) else []
        ripe = [name for name, state in self._terms.items()
                if state.count >= self.dead_after and name not in self._reported_terms]
        parts += [self._terms[name].varied.to(self.device, torch.float64).reshape(1) for name in ripe]
        return (torch.cat(parts) if parts else None), ripe

    def dead_from(self, values: list[float], ripe: list[str]) -> tuple[list[str], list[str]]:
        """(dead parameters, dead terms) from the numbers of :meth:`dead_check` (each name reported once)."""
        params: list[str] = []
        n_alive = len(values) - len(ripe)
        if n_alive:
            params = [name for name, ok in zip(self.names, values[:n_alive])
                      if not ok and name not in self._reported_params]
            self._reported_params.update(params)
            if params:
                log.warning("no gradient in %d steps for %d parameter(s): %s", self._observed, len(params), params)
        terms = [name for name, changed in zip(ripe, values[n_alive:]) if not changed]
        self._reported_terms.update(ripe)
        if terms:
            log.warning("loss term(s) constant over %d observations: %s", self.dead_after, terms)
        return params, terms

    def dead_parameters(self) -> list[str]:
        """Names of parameters that received no non-zero finite gradient in ``dead_after`` or more
        observations; each name is returned once. Empty until enough observations (one sync)."""
        self._commit()
        if self._observed < self.dead_after:
            return []
        return self.dead_from([float(ok) for ok in self._alive.tolist()], [])[0]

    def dead_terms(self) -> list[str]:
        """Names of loss terms constant (including identically zero) over ``dead_after`` or more
        observations; each name is returned once (a term that changed once is settled for good)."""
        ripe = [name for name, state in self._terms.items()
                if state.count >= self.dead_after and name not in self._reported_terms]
        if not ripe:
            return []
        return self.dead_from(torch.stack([self._terms[n].varied.to(self.device) for n in ripe]).double().tolist(),
                              ripe)[1]
