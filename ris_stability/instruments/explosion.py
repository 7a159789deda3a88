"""Gradient explosions from step 0: growth judged against what is already known, not a running median.

The running-median spike rule (``spikes.py``) needs a baseline of several logged steps; an exploding run
(a too-large learning rate, a bad initialisation, an unnormalised input) is often dead by then. Each logged
step with finite gradients is judged here against:

* **growth**: the total gradient norm over its previous logged value. Above ``CATASTROPHIC_GROWTH`` (1e6x in
  one step) it is catastrophic; above ``EARLY_GROWTH`` (100x) it is a warning while the spike rule has no
  baseline yet (afterwards that rule judges moderate jumps);
* **range**: a total gradient norm beyond the dtype's range (``explosion_norm_limit``: its square
  overflows, 1.8e19 in float32) is catastrophic;
* **update size**: under torch.optim.SGD the update is lr * g, known before the optimizer steps; an update
  larger than the parameters' own norm (||lr g|| / ||w|| > ``CATASTROPHIC_UPDATE``) is catastrophic. Adaptive
  optimizers (Adam & co.) normalise g, so lr * g says nothing about their update: not judged.

Each verdict names the modules and the linalg sites whose own gradient norm grew most over their previous
logged value (at the first logged step: the largest). The detector also keeps each logged step's parameter norms (taken before the update) and
gradient norms, so that a later crash or non-finite loss can be traced back to the update that put the
parameters out of range (:meth:`ExplosionDetector.trace_back`).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from ris_stability.numerics.tolerances import explosion_norm_limit

TOTAL = "_total"
CATASTROPHIC_GROWTH = 1e6  # the total gradient norm over its previous logged value, in one step
EARLY_GROWTH = 100.0  # a warning while the spike rule has no baseline: a 10x wobble at step 1 is common
CATASTROPHIC_UPDATE = 1.0  # ||lr g|| / ||w||: the update would change the parameters by more than their norm
NAMED_GROWTH = 10.0  # a module or linalg site whose own norm grew more than this is named as having jumped
TRACE_GROWTH = 100.0  # parameter growth in one update that a crash is traced back to
HISTORY = 256  # logged steps kept for the trace-back


def _ratio(value: float, previous: float | None) -> float:
    if previous is None or not math.isfinite(value):
        return math.nan
    return value / previous if previous > 0 else (math.inf if value > 0 else 1.0)


@dataclass(frozen=True)
class Growth:
    """One series (a module, a linalg site) at the judged step against its previous logged value."""

    name: str
    value: float
    previous: float | None

    @property
    def ratio(self) -> float:
        return _ratio(self.value, self.previous)

    def text(self, kind: str) -> str:
        grew = f", x{self.ratio:.3g}" if math.isfinite(self.ratio) else ""
        return f"{kind} {self.name} ({self.value:.3g}{grew})"


@dataclass(frozen=True)
class Explosion:
    """A step whose gradient grew out of bounds: ``rules`` met, ``catastrophic`` when one of them is."""

    step: int
    total: float
    previous: float | None
    first: float | None
    rules: tuple[str, ...]
    catastrophic: bool
    limit: float
    dtype: str
    update_ratio: float | None = None
    modules: tuple[Growth, ...] = ()
    sites: tuple[Growth, ...] = ()

    def message(self) -> str:
        what = "gradient explosion" if self.catastrophic else "gradient growth"
        known = [f"{_ratio(self.total, ref):.3g}x {name} {ref:.3g}" for name, ref in
                 (("the previous logged step's", self.previous), ("its first logged value", self.first))
                 if ref is not None and self.step > 0]
        text = f"{what} at step {self.step}: total grad norm {self.total:.3g}" + (f" ({', '.join(known)})" if known else "")
        reasons = []
        if "growth" in self.rules or "early_growth" in self.rules:
            limit = CATASTROPHIC_GROWTH if "growth" in self.rules else EARLY_GROWTH
            reasons.append(f"grew more than {limit:.3g}x in one logged step")
        if "range" in self.rules:
            reasons.append(f"beyond {self.dtype}'s range for a norm ({self.limit:.3g}: its square overflows)")
        if "update" in self.rules:
            reasons.append(f"the SGD update lr*g would change the parameters by {self.update_ratio:.3g}x their own norm")
        first = all(g.previous is None for g in self.modules + self.sites)
        named = [g.text("module") for g in self.modules[:4]] + [g.text("linalg site") for g in self.sites[:4]]
        return (text + ": " + "; ".join(reasons)
                + (f"; {'largest' if first else 'grew most'}: " + ", ".join(named) if named else ""))

    def data(self) -> dict:
        series = lambda gs: [{"name": g.name, "value": g.value, "previous": g.previous} for g in gs]  # noqa: E731
        return {"total": self.total, "previous": self.previous, "first": self.first, "rules": list(self.rules),
                "catastrophic": self.catastrophic, "limit": self.limit, "update_ratio": self.update_ratio,
                "modules": series(self.modules), "sites": series(self.sites),
                "names": [g.name for g in self.modules] + [g.name for g in self.sites]}


@dataclass(frozen=True)
class UpdateOrigin:
    """The update that put a module's parameters out of range (what a later crash is traced back to)."""

    module: str
    step: int  # the step whose update it was
    next_step: int | None  # the next logged step (None: the crash itself); != step + 1 when steps were not logged
    before: float
    after: float
    grad: float | None  # total gradient norm of that step
    grad_first: float | None

    def message(self) -> str:
        when = (f"at the update of step {self.step}" if self.next_step in (None, self.step + 1)
                else f"between steps {self.step} and {self.next_step} (not every step was logged)")
        text = f"parameters of {self.module} grew from {self.before:.3g} to {self.after:.3g} {when}"
        if self.grad is not None:
            text += f", gradient norm {self.grad:.3g}"
            if self.grad_first and self.step > 0:
                text += f" = {self.grad / self.grad_first:.3g}x its first value"
        return text

    def data(self) -> dict:
        return {"module": self.module, "update_step": self.step, "before": self.before, "after": self.after,
                "grad_norm": self.grad, "first_grad_norm": self.grad_first, "origin": self.message()}


@dataclass
class _Record:
    step: int
    params: dict[str, float]  # parameter norms per module (and _total) before the step's update
    grad: float


@dataclass
class ExplosionDetector:
    """Judges each logged step's finite gradient norms (:meth:`observe`); ``dtype``: the parameters' dtype."""

    dtype: torch.dtype = torch.float32
    _previous: dict[str, float] = field(default_factory=dict)
    _first: dict[str, float] = field(default_factory=dict)
    _records: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    @property
    def limit(self) -> float:
        return explosion_norm_limit(self.dtype)

    def observe(self, step: int, total: float, modules: dict[str, float], sites: dict[str, float] | None = None,
                params: dict[str, float] | None = None, update_ratio: float | None = None,
                has_baseline: bool = False) -> Explosion | None:
        """Judge a step (``params``: parameter norms per module before the update, ``update_ratio``: the
        SGD update ||lr g|| / ||w||, None when not known); ``has_baseline``: the spike rule is judging
        moderate jumps already. Returns the verdict, or None for a healthy step."""
        sites = sites or {}
        if params:
            self._records.append(_Record(step, dict(params), total))
        if not math.isfinite(total):
            return None  # non-finite gradients are the non-finite checks' business
        previous = self._previous.get(TOTAL)
        growth = _ratio(total, previous)
        rules = []
        if growth > CATASTROPHIC_GROWTH:
            rules.append("growth")
        if total > self.limit:
            rules.append("range")
        if update_ratio is not None and update_ratio > CATASTROPHIC_UPDATE:
            rules.append("update")
        catastrophic = bool(rules)
        if not catastrophic and not has_baseline and growth > EARLY_GROWTH:
            rules.append("early_growth")
        series = [(f"module/{n}", v) for n, v in modules.items()] + [(f"site/{n}", v) for n, v in sites.items()]
        verdict = None
        if rules:
            verdict = Explosion(step, total, previous, self._first.get(TOTAL), tuple(rules), catastrophic,
                                self.limit, str(self.dtype).removeprefix("torch."), update_ratio,
                                self._grown(modules, "module/"), self._grown(sites, "site/"))
        for name, value in [(TOTAL, total)] + series:  # growth is step to step, whatever the verdict
            if math.isfinite(value):
                self._previous[name] = value
                self._first.setdefault(name, value)
        return verdict

    def _grown(self, values: dict[str, float], prefix: str) -> tuple[Growth, ...]:
        """The series that grew more than NAMED_GROWTH (at a first step: the largest), most grown first."""
        growths = [Growth(n, v, self._previous.get(prefix + n)) for n, v in values.items() if math.isfinite(v)]
        jumped = [g for g in growths if g.ratio > NAMED_GROWTH or (g.previous is None and g.value > 0)]
        # by growth (to 3 digits: equal growths then by size), or by size where a series has no previous value
        key = ((lambda g: (-float(f"{g.ratio:.3g}"), -g.value)) if all(g.previous is not None for g in jumped)
               else (lambda g: -g.value))
        return tuple(sorted(jumped or [g for g in growths if g.value > self.limit], key=key))

    def first_grad(self) -> float | None:
        return self._first.get(TOTAL)

    def trace_back(self, now: dict[str, float], skipped: set[int] | frozenset = frozenset()) -> UpdateOrigin | None:
        """The update that grew some module's parameters the most, when it grew them more than TRACE_GROWTH
        times or out of range. ``now``: parameter norms per module after the last update (from
        ``GradMonitor.param_norms``); ``skipped``: steps whose update did not run."""
        records = list(self._records)
        if not records:
            return None
        best: UpdateOrigin | None = None
        best_growth = 0.0
        for i, rec in enumerate(records):
            if rec.step in skipped:
                continue
            after = records[i + 1].params if i + 1 < len(records) else now
            next_step = records[i + 1].step if i + 1 < len(records) else None
            for module, before in rec.params.items():
                if module == TOTAL or module not in after:
                    continue
                a = after[module]
                # from zero (a zero-initialised layer) only an out-of-range result counts as growth
                grown = (_ratio(a, before) if before > 0 and math.isfinite(a)
                         else math.inf if not math.isfinite(a) or a > self.limit else 0.0)
                if not grown > best_growth:
                    continue
                best_growth = grown
                best = UpdateOrigin(module, rec.step, next_step, before, after[module], rec.grad, self.first_grad())
        if best is None or not (best_growth > TRACE_GROWTH or best.after > self.limit):
            return None
        return best


__all__ = ["CATASTROPHIC_GROWTH", "CATASTROPHIC_UPDATE", "EARLY_GROWTH", "Explosion", "ExplosionDetector",
           "Growth", "UpdateOrigin"]
