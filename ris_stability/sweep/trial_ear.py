"""The sweep's ear inside a script trial: the trace-writer listener that prunes the running script.

The trial's process (``python -m ris_stability.cli.sweep_trial SPEC.json -- python train.py --lr 0.01``)
runs the user's command exactly as ``risdiag trace`` does (unmodified, in that process, the monitor attached
by hooks) and adds a :class:`TrialEar` to the run's trace writer (``sinks.also_listen``). At each logged
step the ear

- feeds the stability rules (``pruning.StabilityWatch``: tie, non-finite budget, gradient explosion); a
  non-finite verdict waits up to ``LOCATE_ATTEMPTS`` steps for the in-process locator's finding, so the
  reason names the op;
- reports the metric, when the trace or ``report_metric`` provides it during the run, to the trial in the
  Optuna storage and asks the median pruner;
- notices that the sweep worker that started it is gone (its parent changed) and stops.

Stopping is a ``SystemExit(0)`` raised from the listener once the step's row is written (the trace then
closes as at the script's own end: summary, report). ``result()`` is what the trial process hands to the
worker, which owns the trial's state in the storage.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from ris_stability.sweep.metrics import is_trace_metric, trace_value
from ris_stability.sweep.pruning import StabilityRules, StabilityWatch, Verdict

log = logging.getLogger(__name__)

LOCATE_ATTEMPTS = 3  # steps a non-finite verdict waits for the locator's finding (the driver's attempts)


class TrialStop(SystemExit):
    """Ends the traced script at a step end; code 0, so the trace closes as at the script's own end."""

    def __init__(self, reason: str):
        super().__init__(0)
        self.reason = reason


def finding_text(finding: Mapping[str, Any]) -> str:
    """``op sqrt in model at train.py:23 (phase forward)`` from a Finding's dict."""
    op = finding.get("node") or finding.get("op") or "?"
    parts = [f"op {op}"]
    if finding.get("module"):
        parts.append(f"in {finding['module']}")
    if finding.get("location"):
        parts.append(f"at {finding['location']}")
    if finding.get("phase"):
        parts.append(f"(phase {finding['phase']})")
    return " ".join(parts)


@dataclass
class TrialEar:
    """The trace-writer listener of one trial (see the module docstring). ``trial``: an Optuna trial (or any
    object with ``report(value, step)`` and ``should_prune()``), None for no median pruning."""

    each_step = True  # the monitor writes each row at its step's end: the verdict is judged as the step ends
    metric: str
    rules: StabilityRules = field(default_factory=StabilityRules)
    trial: Any = None
    parent_pid: int | None = None
    report_every: int = 1
    watch: StabilityWatch = field(init=False)
    verdict: Verdict | None = None
    finding: str = ""
    trace_last: float | None = None
    reported: dict[str, float] = field(default_factory=dict)
    step: int = -1
    orphaned: bool = False

    def __post_init__(self) -> None:
        self.watch = StabilityWatch(self.rules)

    # -- trace writer listener ---------------------------------------------------------------------------
    def __call__(self, kind: str, record: Mapping[str, Any]) -> None:
        self.watch.observe(kind, record)
        if kind == "event" and record.get("kind") == "finding" and not self.finding:
            self.finding = finding_text((record.get("data") or {}).get("finding") or {})
        elif kind == "step":
            self._step(record)

    def _step(self, row: Mapping[str, Any]) -> None:
        self.step = step = int(row["step"])
        if is_trace_metric(self.metric) and self.metric not in self.reported:
            value = trace_value(dict(row), self.metric)
            if value is not None:
                self.trace_last = value
                if math.isfinite(value) and step % self.report_every == 0:
                    self._intermediate(value, step)
        verdict = self.watch.end_step(step)
        if verdict is not None and self.verdict is None:
            waiting = verdict.rule == "nonfinite" and not self.finding and step - verdict.step < LOCATE_ATTEMPTS
            if not waiting:
                self._stop(verdict)
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.orphaned = True
            raise TrialStop(f"the sweep worker (pid {self.parent_pid}) that started this trial is gone")

    # -- report_metric handler ------------------------------------------------------------------------
    def on_metric(self, name: str, value: float, step: int | None) -> None:
        self.reported[name] = value
        if name == self.metric and math.isfinite(value):
            self._intermediate(value, self.step if step is None else step)

    # -- decisions ------------------------------------------------------------------------------------------
    def _intermediate(self, value: float, step: int) -> None:
        if self.trial is None or self.verdict is not None:
            return
        self.trial.report(value, max(step, 0))
        if self.trial.should_prune():
            self._stop(Verdict("median", step, (
                f"median: {self.metric} {value:.4g} at step {step} is worse than the median of the other trials at "
                "that step (Optuna's pruner)")))

    def _stop(self, verdict: Verdict) -> None:
        reason = verdict.reason
        if verdict.rule == "nonfinite":  # the op first: tables cut long reasons, and the op is the news
            reason = (f"non-finite from step {verdict.step}, located: {self.finding}; {reason}" if self.finding
                      else f"{reason}; the locator named no op (the fault did not recur)")
        self.verdict = Verdict(verdict.rule, verdict.step, reason)
        raise TrialStop(f"pruned by the sweep ({verdict.rule})")

    def result(self) -> dict[str, Any]:
        return {"verdict": asdict(self.verdict) if self.verdict else None, "finding": self.finding,
                "trace_last": self.trace_last, "reported": dict(self.reported), "last_step": self.step,
                "orphaned": self.orphaned, "watch": self.watch.summary(),
                "nonfinite_steps": list(self.watch.nonfinite_steps)}


__all__ = ["LOCATE_ATTEMPTS", "TrialEar", "TrialStop", "finding_text"]
