"""The process of one script trial: ``risdiag trace --out TRIALDIR -- COMMAND`` plus the sweep's ear.

``python -m ris_stability.sweep.trial_process SPEC.json -- python train.py --lr 0.01`` runs the user's
command exactly as ``risdiag trace`` does (unmodified, in this process, the monitor attached by hooks) and
adds one listener to the run's trace writer (``sinks.also_listen``). At each logged step the listener

- feeds the stability rules (``pruning.StabilityWatch``: tie, non-finite budget, gradient explosion); a
  non-finite verdict waits up to ``LOCATE_ATTEMPTS`` steps for the in-process locator's finding, so the
  reason names the op;
- reports the metric, when the trace or ``report_metric`` provides it during the run, to the trial in the
  Optuna storage and asks the median pruner;
- notices that the sweep worker that started it is gone (its parent changed) and stops.

Stopping is a ``SystemExit(0)`` raised from the listener once the step's row is written (the trace then
closes as at the script's own end: summary, report). The outcome goes to ``SPEC["result"]`` as JSON for the
worker, which owns the trial's state in the storage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ris_stability.records import UsageError
from ris_stability.sweep.metrics import add_handler, is_trace_metric, trace_value
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
        if verdict.rule == "nonfinite":
            reason += f"; located: {self.finding}" if self.finding else "; the locator named no op (the fault did not recur)"
        self.verdict = Verdict(verdict.rule, verdict.step, reason)
        raise TrialStop(f"pruned by the sweep ({verdict.rule})")

    def result(self) -> dict[str, Any]:
        return {"verdict": asdict(self.verdict) if self.verdict else None, "finding": self.finding,
                "trace_last": self.trace_last, "reported": dict(self.reported), "last_step": self.step,
                "orphaned": self.orphaned, "watch": self.watch.summary(),
                "nonfinite_steps": list(self.watch.nonfinite_steps)}


def _optuna_trial(spec: Mapping[str, Any]) -> Any:
    """The running trial in the storage, with the study's median pruner (None when the spec has no storage)."""
    if not spec.get("storage"):
        return None
    import optuna

    from ris_stability.sweep.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=spec["study"], storage=open_storage(spec["storage"], spec["heartbeat_s"]),
                              sampler=optuna.samplers.RandomSampler(),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=spec["startup_trials"]))
    return optuna.trial.Trial(study, spec["trial_id"])


def run(spec: Mapping[str, Any], argv: list[str]) -> int:
    """Trace ``argv`` into ``spec["run_dir"]`` with the trial's listener; write the result file."""
    from rich.console import Console

    from ris_stability.attach.script import report_to, trace_script
    from ris_stability.sinks import open_sinks
    from ris_stability.sinks.base import also_listen

    ear = TrialEar(spec["metric"], StabilityRules(**spec["rules"]), _optuna_trial(spec), spec.get("parent_pid"),
                   spec.get("report_every", 1))
    remove = add_handler(ear.on_metric)
    err = Console(file=sys.stderr, soft_wrap=True)
    out: dict[str, Any] = {}
    code = 0
    try:
        with open_sinks(tensorboard=spec.get("tensorboard"), mlflow=spec.get("mlflow", False)), \
                also_listen(lambda run_dir, meta: ear):
            traced = trace_script(argv, spec["run_dir"], live=False, on_nonfinite=spec.get("on_nonfinite", "skip"))
            report_to(traced, err, err, report=spec.get("reports", True))
        w = traced.watcher
        out = {"code": traced.code, "status": w.status, "steps": w.steps, "message": traced.message,
               "error": f"{type(traced.error).__name__}: {traced.error}" if traced.error is not None else ""}
    except UsageError as exc:  # the rendered command cannot run (e.g. a placeholder made a missing path)
        log.error("the trial's command cannot run: %s", exc)
        out, code = {"code": 2, "status": "usage", "error": f"{type(exc).__name__}: {exc}"}, 2
    finally:
        remove()
        out.update(ear.result())
        Path(spec["result"]).write_text(json.dumps(out, allow_nan=True, indent=1))
    return code


def main(args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    if len(args) < 3 or args[1] != "--":
        sys.stderr.write("usage: python -m ris_stability.sweep.trial_process SPEC.json -- COMMAND...\n")
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    spec = json.loads(Path(args[0]).read_text())
    return run(spec, args[2:])


if __name__ == "__main__":
    sys.exit(main())
