"""Stability-aware pruning: turn a monitored run's step rows and events into a stop decision with a reason.

``StabilityWatch`` listens to a StabilityMonitor (``StabilityMonitor(..., listeners=[watch.observe])``) and
after each step says whether the run should be pruned, and why:

- ``tie``: a matrix whose eigenvectors (singular vectors) receive gradient has a tied cluster of
  eigenvalues (the monitor's ``tied_eigenvalues`` event, judged by the one tie rule) and the op's backward
  is not tie-safe: its backward divides by the zero gaps, so the gradient is 0/0 now or soon;
- ``nonfinite``: more non-finite steps than the budget;
- ``grad_explosion``: the total gradient norm exceeds ``explode_factor`` x its early baseline (the median of
  the first ``baseline_steps`` finite norms) or the absolute ``grad_norm_max``.

It needs no Optuna: the sweep's trial glue (``trial.py``) turns a verdict into a pruned trial.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping

from ris_stability.records import GRAD_TOTAL, MAT_PREFIX, SettingError

# Ops whose backward masks tied pairs by construction (ris_stability.spectral's gap-aware eigh / svd and
# any op named after them): a tie there is harmless, so it is tracked but never prunes.
TIE_SAFE_MARK = "gap_aware"


@dataclass(frozen=True)
class StabilityRules:
    nonfinite_budget: int = 0  # non-finite steps tolerated; one more prunes the trial
    prune_on_tie: bool = True
    explode_factor: float = 1.0e4  # x the baseline gradient norm
    baseline_steps: int = 5  # finite gradient norms that make the baseline (median)
    grad_norm_max: float = math.inf  # absolute limit on the total gradient norm
    tie_safe_mark: str = TIE_SAFE_MARK

    def __post_init__(self) -> None:
        if self.nonfinite_budget < 0 or self.baseline_steps < 1 or not self.explode_factor > 1:
            raise SettingError(f"StabilityRules: nonfinite_budget={self.nonfinite_budget} must be >= 0, baseline_steps="
                             f"{self.baseline_steps} >= 1, explode_factor={self.explode_factor} > 1")


@dataclass(frozen=True)
class Verdict:
    rule: str  # "tie" | "nonfinite" | "grad_explosion" | "median" (set by the trial glue)
    step: int
    reason: str


_PRIORITY = ("tie", "nonfinite", "grad_explosion")  # the tie is the cause of the non-finite steps it brings


def op_of(site: str) -> str:
    """The op of a probe site name ``module:op`` (``@location`` suffix of a second call site dropped)."""
    return site.split("@", 1)[0].rsplit(":", 1)[-1]


@dataclass
class StabilityWatch:
    rules: StabilityRules = field(default_factory=StabilityRules)
    nonfinite_steps: list[int] = field(default_factory=list)
    first_nonfinite: str = ""  # the monitor's message for the first non-finite step
    min_gap: float = math.inf  # smallest eigengap seen at a site whose vectors receive gradient
    min_gap_site: str = ""
    ties: list[str] = field(default_factory=list)  # every tie seen (also tie-safe ones), as text
    verdict: Verdict | None = None
    _norms: list[float] = field(default_factory=list)
    _pending: dict[str, Verdict] = field(default_factory=dict)

    # -- listener -----------------------------------------------------------------------------
    def observe(self, kind: str, record: Mapping[str, Any]) -> None:
        """A StabilityMonitor listener: ``kind`` is "step" (a step row) or "event" (an event record)."""
        if kind == "event":
            self._event(record)
        elif kind == "step":
            self._row(record)

    def end_step(self, step: int) -> Verdict | None:
        """Call after the monitor has finished ``step``: the verdict (first one sticks), or None."""
        if self.verdict is None and self._pending:
            rule = next(r for r in _PRIORITY if r in self._pending)
            self.verdict = self._pending[rule]
        self._pending.clear()
        return self.verdict

    def summary(self) -> dict[str, Any]:
        """Trial attributes: non-finite steps, smallest gap and where, ties seen."""
        return {"nonfinite_steps": len(self.nonfinite_steps),
                "first_nonfinite_step": self.nonfinite_steps[0] if self.nonfinite_steps else None,
                "min_gap": self.min_gap if math.isfinite(self.min_gap) else None,
                "min_gap_site": self.min_gap_site, "ties": self.ties[:5]}

    # -- rules --------------------------------------------------------------------------------
    def _event(self, record: Mapping[str, Any]) -> None:
        kind, step, data = record.get("kind"), record.get("step"), record.get("data") or {}
        if kind in ("nonfinite_grad", "nonfinite_loss") and step not in self.nonfinite_steps:
            self.nonfinite_steps.append(step)
            self.first_nonfinite = self.first_nonfinite or str(record.get("message", ""))
            n, budget = len(self.nonfinite_steps), self.rules.nonfinite_budget
            if n > budget:
                self._pending.setdefault("nonfinite", Verdict("nonfinite", step, (
                    f"{n} non-finite step(s) > budget {budget} (first: {self.first_nonfinite})")))
        elif kind == "tied_eigenvalues" and data.get("vec_grad"):
            self._tie(step, data)

    def _tie(self, step: int, data: Mapping[str, Any]) -> None:
        site = str(data.get("matrix", "?"))
        op = op_of(site)
        cluster, value = int(data.get("max_cluster") or 0), data.get("cluster_value")
        where = f" at {data['location']}" if data.get("location") else ""
        tie = f"{cluster} eigenvalues of {site} tied at {_fmt(value)} (step {step}{where})"
        self.ties.append(tie)
        if self.rules.tie_safe_mark and self.rules.tie_safe_mark in op:
            return
        if self.rules.prune_on_tie:
            self._pending.setdefault("tie", Verdict("tie", step, (
                f"tie: {tie} while its eigenvectors receive gradient; {op}'s backward divides by these zero gaps "
                f"(0/0). Next step: a tie-safe ({self.rules.tie_safe_mark}) backward or a spectrum without the tie")))

    def _row(self, row: Mapping[str, Any]) -> None:
        for key, value in row.items():
            if key.startswith(MAT_PREFIX) and key.endswith("/min_gap"):
                site = key[len(MAT_PREFIX):-len("/min_gap")]
                if row.get(f"{MAT_PREFIX}{site}/vec_grad") and _finite(value) and value < self.min_gap:
                    self.min_gap, self.min_gap_site = float(value), site
        norm = row.get(GRAD_TOTAL)
        if _finite(norm):
            self._explosion(int(row["step"]), float(norm))

    def _explosion(self, step: int, norm: float) -> None:
        r = self.rules
        if norm > r.grad_norm_max:
            self._pending.setdefault("grad_explosion", Verdict("grad_explosion", step, (
                f"gradient explosion: total gradient norm {norm:.3g} at step {step} > limit {r.grad_norm_max:.3g}")))
        if len(self._norms) < r.baseline_steps:
            self._norms.append(norm)
            return
        base = statistics.median(self._norms)
        if base > 0 and norm > r.explode_factor * base:
            self._pending.setdefault("grad_explosion", Verdict("grad_explosion", step, (
                f"gradient explosion: total gradient norm {norm:.3g} at step {step} is {norm / base:.3g} x the baseline "
                f"{base:.3g} (median of the first {r.baseline_steps} logged steps) > factor {r.explode_factor:g}")))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    return f"{value:.3e}" if _finite(value) else str(value)
