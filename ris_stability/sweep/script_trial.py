"""One trial of a script sweep, seen from the worker: render the command, run its traced process, judge.

The trial's process is ``python -m ris_stability.cli.sweep_trial SPEC -- COMMAND`` (see there) with the
parameters in the command and in ``RISDIAG_PARAM_*`` environment variables, its stdout and stderr in the
trial's run folder (``stdout.txt``, ``stderr.txt``). From its result file and exit status the worker
records the outcome as the trial's user attributes (the same ones as a config sweep's: status, prune rule
and reason, non-finite steps, smallest gap, error) and returns the objective or raises ``TrialPruned`` /
``TrialCrashed``. A trial whose process dies by a signal fails with the signal named.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna

from ris_stability.records import UsageError
from ris_stability.sweep.metrics import is_trace_metric, last_json_metrics
from ris_stability.sweep.pruning import StabilityRules
from ris_stability.sweep.space import SearchSpace
from ris_stability.sweep.template import CommandTemplate
from ris_stability.sweep.trial import FAILED, NONFINITE, PRUNED, STABLE, TrialCrashed
from ris_stability.sweep.workers import signal_name

log = logging.getLogger(__name__)

SPEC_FILE, RESULT_FILE, STDOUT_FILE, STDERR_FILE = "sweep_trial.json", "sweep_result.json", "stdout.txt", "stderr.txt"


class MetricMissing(UsageError):
    """A trial ran to its end without the ``--metric``: the sweep stops (every trial would do the same)."""


@dataclass(frozen=True)
class ScriptSettings:
    out_root: Path
    rules: StabilityRules
    metric: str
    storage: str
    study: str
    heartbeat_s: int
    startup_trials: int
    report_every: int = 10
    trial_reports: bool = True
    tensorboard: str | None = None
    mlflow: bool = False
    extra_env: Mapping[str, str] = field(default_factory=dict)


def _spec(trial: optuna.Trial, s: ScriptSettings, run_dir: Path) -> dict[str, Any]:
    rules = {k: getattr(s.rules, k) for k in ("nonfinite_budget", "prune_on_tie", "explode_factor", "baseline_steps",
                                              "grad_norm_max", "tie_safe_mark")}
    return {"storage": s.storage, "study": s.study, "trial_id": trial._trial_id, "heartbeat_s": s.heartbeat_s,
            "startup_trials": s.startup_trials, "report_every": s.report_every, "metric": s.metric, "rules": rules,
            "run_dir": str(run_dir),
            "result": str(run_dir / RESULT_FILE), "parent_pid": os.getpid(), "reports": s.trial_reports,
            "tensorboard": s.tensorboard, "mlflow": s.mlflow}  # TensorBoard: DIR/trial-NNNN (the run folder name)


def _tail(path: Path, lines: int = 1) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:])


def run_process(argv: list[str], env: Mapping[str, str], run_dir: Path, trial: optuna.Trial) -> int:
    """Run the trial's process; its pid is stored on the trial (the launcher ends it if this worker dies)."""
    with open(run_dir / STDOUT_FILE, "w") as out, open(run_dir / STDERR_FILE, "w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=dict(env))
        trial.set_user_attr("trial_pid", proc.pid)
        try:
            return proc.wait()
        except BaseException:  # our own child, by pid: interrupted with us
            proc.kill()
            proc.wait()
            raise


def metric_value(metric: str, result: Mapping[str, Any], stdout: str) -> tuple[float | None, str]:
    """The trial's objective and where it came from (report_metric > final JSON line > the trace)."""
    if metric in result.get("reported", {}):
        return float(result["reported"][metric]), "report_metric"
    json_metrics = last_json_metrics(stdout)
    if metric in json_metrics:
        return json_metrics[metric], "final JSON line"
    if is_trace_metric(metric) and result.get("trace_last") is not None:
        return float(result["trace_last"]), "trace"
    return None, ""


def _record(trial: optuna.Trial, result: Mapping[str, Any], run_dir: Path) -> None:
    for key, value in (result.get("watch") or {}).items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("steps_run", result.get("last_step", -1) + 1)
    if (run_dir / "report.md").is_file():
        trial.set_user_attr("report", str(run_dir / "report.md"))


def judge(trial: optuna.Trial, metric: str, code: int, run_dir: Path) -> float:
    """The outcome of a finished trial process: the objective, or TrialPruned / TrialCrashed / MetricMissing."""
    where = f"see {run_dir / STDERR_FILE}"
    if code < 0:
        raise _fail(trial, f"the trial's process was killed by {signal_name(code)}"
                    + ("; the out-of-memory killer sends it too (see dmesg)" if code == -9 else "") + f"; {where}")
    if not (run_dir / RESULT_FILE).is_file():
        raise _fail(trial, f"the trial's process exited with code {code} before writing its result: "
                    f"{_tail(run_dir / STDERR_FILE) or 'no output'}; {where}")
    result = json.loads((run_dir / RESULT_FILE).read_text())
    _record(trial, result, run_dir)
    verdict = result.get("verdict")
    if verdict:
        trial.set_user_attr("status", PRUNED)
        trial.set_user_attr("prune_rule", verdict["rule"])
        trial.set_user_attr("prune_reason", verdict["reason"])
        trial.set_user_attr("prune_step", verdict["step"])
        log.info("trial %d pruned at step %d: %s", trial.number, verdict["step"], verdict["reason"])
        raise optuna.TrialPruned(verdict["reason"])
    if result.get("error") or result.get("status") in ("crashed", "no_steps"):
        raise _fail(trial, (result.get("error") or result.get("message") or result.get("status")) + f"; {where}")
    stdout = (run_dir / STDOUT_FILE).read_text(errors="replace") if (run_dir / STDOUT_FILE).is_file() else ""
    value, source = metric_value(metric, result, stdout)
    if value is None:
        _fail(trial, f"--metric {metric!r}: the run reported no such value")
        raise MetricMissing(
            f"--metric {metric!r}: trial {trial.number} ran to its end without it (no report_metric({metric!r}, ...) "
            f"call, no final JSON line with {metric!r} on stdout{', no such column in the trace' if is_trace_metric(metric) else ''}"
            f"); its output: {run_dir / STDOUT_FILE}. Report it from the script or choose another --metric")
    trial.set_user_attr("metric_source", source)
    if not math.isfinite(value):
        trial.set_user_attr("status", PRUNED)
        trial.set_user_attr("prune_rule", "nonfinite")
        trial.set_user_attr("prune_reason", f"{metric} is {value} at the end of the run ({source})")
        raise optuna.TrialPruned(f"{metric} is {value}")
    trial.set_user_attr("status", NONFINITE if result.get("nonfinite_steps") else STABLE)
    return value


def _fail(trial: optuna.Trial, reason: str) -> TrialCrashed:
    trial.set_user_attr("status", FAILED)
    trial.set_user_attr("error", reason)
    log.error("trial %d failed: %s", trial.number, reason)
    return TrialCrashed(f"trial {trial.number}: {reason}")


def make_script_objective(template: CommandTemplate, space: SearchSpace,
                          s: ScriptSettings) -> Callable[[optuna.Trial], float]:
    """The Optuna objective of a script sweep (the worker's side of each trial)."""

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        run_dir = s.out_root / f"trial-{trial.number:04d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = template.render(params)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("command", argv)
        (run_dir / SPEC_FILE).write_text(json.dumps(_spec(trial, s, run_dir), indent=1))
        log.info("trial %d: %s -> %s", trial.number, params, run_dir)
        env = {**os.environ, **s.extra_env, **template.env(params)}
        code = run_process([sys.executable, "-m", "ris_stability.cli.sweep_trial", str(run_dir / SPEC_FILE), "--",
                            *argv], env, run_dir, trial)
        return judge(trial, s.metric, code, run_dir)

    return objective


__all__ = ["MetricMissing", "ScriptSettings", "judge", "make_script_objective", "metric_value"]
