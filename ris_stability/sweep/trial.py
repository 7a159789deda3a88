"""One Optuna trial = one traced run of the target: parameters, pruning, attributes, the trial's report.

``TrialHooks`` is what a target wires into its loop (see target.py): a monitor listener feeding the
StabilityWatch, a loop callback that stops the run on a stability verdict, and ``report`` for the
intermediate validation metric (Optuna's pruner, e.g. MedianPruner, judges it). Every trial records its
outcome as user attributes: run folder, host, non-finite steps, smallest gap, status, prune rule and reason.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna

from ris_stability.records import UsageError
from ris_stability.sweep.pruning import StabilityRules, StabilityWatch, Verdict
from ris_stability.sweep.space import SearchSpace
from ris_stability.sweep.target import SweepTarget

log = logging.getLogger(__name__)

# Trial states / outcomes as the report shows them.
STABLE, NONFINITE, PRUNED, FAILED = "stable", "nonfinite", "pruned", "failed"


class TrialCrashed(RuntimeError):
    """The target raised inside a trial (recorded on the trial as ``error``; the sweep goes on)."""


class TrialHooks:
    """The glue between one Optuna trial and the target's training loop."""

    each_step = True  # the monitor writes each row at its step's end: the verdict is judged as the step ends

    def __init__(self, trial: optuna.Trial, rules: StabilityRules, metric: str):
        self.trial, self.metric = trial, metric
        self.watch = StabilityWatch(rules)
        self.verdict: Verdict | None = None
        self.last_step = -1

    def observe(self, kind: str, record: Mapping[str, Any]) -> None:
        """StabilityMonitor listener."""
        self.watch.observe(kind, record)

    def on_step_end(self, ctx: Any) -> None:
        """Loop callback, after the monitor's: stop the run on a stability verdict."""
        self.last_step = ctx.step
        verdict = self.watch.end_step(ctx.step)
        if verdict is not None and self.verdict is None:
            self.verdict = verdict
            ctx.request_stop(f"pruned by the sweep ({verdict.rule})")

    def value_of(self, metrics: Mapping[str, float]) -> float:
        if self.metric not in metrics:
            raise UsageError(f"--metric {self.metric!r} is not a validation metric of this target; available: "
                             f"{', '.join(sorted(metrics))}")
        return float(metrics[self.metric])

    def report(self, step: int, metrics: Mapping[str, float], ctx: Any = None) -> None:
        """An intermediate validation: report it to Optuna and stop the run if its pruner says so."""
        value = self.value_of(metrics)
        self.trial.report(value, step)
        if self.verdict is None and self.trial.should_prune():
            self.verdict = Verdict("median", step, (
                f"median: validation {self.metric} {value:.4g} at step {step} is worse than the median of the "
                "other trials at that step (Optuna's pruner)"))
            if ctx is not None:
                ctx.request_stop("pruned by the sweep (median)")


@dataclass(frozen=True)
class TrialSettings:
    out_root: Path
    rules: StabilityRules
    metric: str
    trial_reports: bool = True


def _record(trial: optuna.Trial, hooks: TrialHooks, run_dir: Path, reports: bool) -> None:
    for key, value in hooks.watch.summary().items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("steps_run", hooks.last_step + 1)
    if reports and (run_dir / "meta.json").exists():
        from ris_stability.report.build import build_report  # matplotlib: only when a report is wanted

        trial.set_user_attr("report", str(build_report(run_dir)))


def _verdict(hooks: TrialHooks, metrics: Mapping[str, float]) -> tuple[Verdict | None, float]:
    # A loop that raised on a non-finite step never reached the step end: its pending evidence decides.
    verdict = hooks.verdict or hooks.watch.end_step(hooks.last_step)
    if verdict is not None:
        return verdict, math.nan
    if not metrics:
        return Verdict("stopped", hooks.last_step, f"the run ended at step {hooks.last_step} without a validation"), math.nan
    value = hooks.value_of(metrics)
    if not math.isfinite(value):
        return Verdict("nonfinite", hooks.last_step, f"validation {hooks.metric} is {value} at the end of the run"), value
    return None, value


def _finish(trial: optuna.Trial, hooks: TrialHooks, metrics: Mapping[str, float]) -> float:
    verdict, value = _verdict(hooks, metrics)
    for key, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
            trial.set_user_attr(f"val/{key}", float(v))
    if verdict is not None:
        trial.set_user_attr("status", PRUNED)
        trial.set_user_attr("prune_rule", verdict.rule)
        trial.set_user_attr("prune_reason", verdict.reason)
        trial.set_user_attr("prune_step", verdict.step)
        log.info("trial %d pruned at step %d: %s", trial.number, verdict.step, verdict.reason)
        raise optuna.TrialPruned(verdict.reason)
    trial.set_user_attr("status", NONFINITE if hooks.watch.nonfinite_steps else STABLE)
    return value


def make_objective(target: SweepTarget, space: SearchSpace, settings: TrialSettings) -> Callable[[optuna.Trial], float]:
    """The Optuna objective: run the target with the trial's parameters; prune on a verdict."""

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        run_dir = settings.out_root / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        log.info("trial %d: %s -> %s", trial.number, params, run_dir)
        hooks = TrialHooks(trial, settings.rules, settings.metric)
        try:
            metrics = target.run(params, run_dir, hooks)
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as err:  # any crash of the user's training fails this trial only
            trial.set_user_attr("status", FAILED)
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            log.error("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
            raise TrialCrashed(f"trial {trial.number}: {type(err).__name__}: {err}") from err
        finally:
            _record(trial, hooks, run_dir, settings.trial_reports)
        return _finish(trial, hooks, metrics)

    return objective


def run_and_tell(study: optuna.Study, objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], None]:
    """Run one claimed trial and tell the study how it ended: COMPLETE with the objective, PRUNED, or FAIL
    (a crash of the user's training fails the trial only; anything else fails it and stops the worker)."""

    def run_trial(trial: optuna.Trial) -> None:
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
        except TrialCrashed:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        except BaseException as err:
            if "error" not in trial.user_attrs:
                trial.set_user_attr("status", FAILED)
                trial.set_user_attr("error", f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        study.tell(trial, value)

    return run_trial
