"""`risdiag sweep`: check everything before any trial, open (or join) the study, run the workers.

Two forms: a script sweep (``-- python train.py --lr {lr}``: each trial runs the user's command, traced,
in its own process; see template.py, script_trial.py) and a config sweep (``--config C [--target T]``: each
trial runs the target in the worker's process; see target.py, trial.py). Before any trial runs -- before
the study is even created -- the space, the command template against the space, the metric, the storage
URL and the output folder are checked; a failure is a UsageError (exit 2, one line).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import RDBStorage

from ris_stability.records import UsageError
from ris_stability.sweep.claims import batch_trials
from ris_stability.sweep.metrics import is_trace_metric, named_in_source
from ris_stability.sweep.pruning import StabilityRules
from ris_stability.sweep.space import SearchSpace, load_space
from ris_stability.sweep.storage import SWEEP_ATTR, check_settings, fail_stale, open_storage
from ris_stability.sweep.target import DEFAULT_TARGET, load_target
from ris_stability.sweep.template import CommandTemplate
from ris_stability.sweep.trial import TrialSettings, make_objective, run_and_tell
from ris_stability.sweep.workers import EXIT_WORKER_LOST, launch, run_worker, worker_command

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepOptions:
    space: str
    trials: int
    storage: str
    study: str
    config: str | None = None
    command: tuple[str, ...] = ()  # a script sweep's command template (after '--')
    steps: int | None = None
    workers: int = 1
    overrides: tuple[str, ...] = ()
    target: str = DEFAULT_TARGET
    metric: str = "loss"
    direction: str = "minimize"
    out: str | None = None  # trial run folders go to OUT/trial-NNNN (default runs/sweep-STUDY)
    seed: int | None = None  # sampler seed (each trial: seed and the study's trial count)
    heartbeat_s: int = 10
    startup_trials: int = 3  # trials the median pruner waits for before it prunes
    report_every: int = 10  # script sweeps: the trace's loss goes to the median pruner every N steps
    trial_reports: bool = True
    rules: StabilityRules = field(default_factory=StabilityRules)
    batch: str = ""  # the id of this command's trials ("" for a new one); workers of one command share it
    tensorboard: str | None = None  # script sweeps: each trial's run also written to TensorBoard DIR/trial-NNNN
    mlflow: bool = False
    metric_check: bool = True  # script sweeps: the metric's name must appear in the script's source

    def __post_init__(self) -> None:
        for name, value, low in (("--trials", self.trials, 1), ("--workers", self.workers, 1),
                                 ("--steps", self.steps, 1), ("--startup-trials", self.startup_trials, 0),
                                 ("--report-every", self.report_every, 1)):
            if value is not None and value < low:
                raise UsageError(f"{name} {value}: must be >= {low}")
        if self.direction not in ("minimize", "maximize"):
            raise UsageError(f"--direction {self.direction!r}: choose minimize or maximize")
        if self.command:
            given = [f for f, v in (("--config", self.config), ("--set", self.overrides), ("--steps", self.steps),
                                    ("--target", self.target != DEFAULT_TARGET)) if v]
            if given:
                raise UsageError(f"{', '.join(given)} apply to config sweeps, not to a command; pass the script's own "
                                 "options in the command after '--' (e.g. --steps as an argument of train.py)")
        elif self.config is None:
            raise UsageError("sweep needs a command ('-- python train.py --lr {lr}') or --config CONFIG (a config sweep)")

    @property
    def out_root(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"sweep-{self.study}"

    def worker_argv(self, index: int) -> list[str]:
        """The ``risdiag sweep`` arguments of worker ``index`` of this command's batch."""
        r = self.rules
        argv = ["sweep", "--space", self.space, "--trials", str(self.trials), "--storage", self.storage, "--study",
                self.study, "--workers", "1", "--batch", self.batch, "--metric", self.metric, "--direction",
                self.direction, "--out", str(self.out_root), "--heartbeat", str(self.heartbeat_s),
                "--startup-trials", str(self.startup_trials), "--report-every", str(self.report_every),
                "--nonfinite-budget", str(r.nonfinite_budget),
                "--explode-factor", repr(r.explode_factor)]
        argv += [] if self.config is None else ["--config", self.config, "--target", self.target]
        argv += [] if self.steps is None else ["--steps", str(self.steps)]
        argv += [] if self.seed is None else ["--seed", str(self.seed)]
        argv += [] if self.trial_reports else ["--no-trial-reports"]
        argv += [] if r.prune_on_tie else ["--no-tie-prune"]
        argv += [] if self.tensorboard is None else ["--tensorboard", self.tensorboard]
        argv += ["--mlflow"] if self.mlflow else []
        argv += [] if self.metric_check else ["--no-metric-check"]
        for o in self.overrides:
            argv += ["--set", o]
        return argv + (["--", *self.command] if self.command else [])

    def settings(self, space: dict[str, Any]) -> dict[str, Any]:
        """What the study remembers (report, joining workers); storage.RESULT_KEYS are checked on join."""
        return {"target": "script" if self.command else self.target, "config": self.config,
                "config_sha256": _sha256(self.config), "overrides": list(self.overrides), "steps": self.steps,
                "command": list(self.command) or None, "space": space, "metric": self.metric,
                "direction": self.direction, "out": str(self.out_root), "cwd": os.getcwd(),
                "heartbeat_s": self.heartbeat_s,
                "startup_trials": self.startup_trials, "report_every": self.report_every,
                "rules": {k: v for k, v in asdict(self.rules).items() if isinstance(v, (int, float, str, bool))}}


def _sha256(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed)


def open_study(opts: SweepOptions, space: dict[str, Any], storage: RDBStorage | None = None) -> optuna.Study:
    storage = storage or open_storage(opts.storage, opts.heartbeat_s)
    study = optuna.create_study(
        storage=storage, study_name=opts.study, direction=opts.direction, load_if_exists=True,
        sampler=make_sampler(opts.seed), pruner=optuna.pruners.MedianPruner(n_startup_trials=opts.startup_trials))
    check_settings(study, opts.settings(space))
    return study


def study_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _check_script(opts: SweepOptions, space: SearchSpace) -> tuple[CommandTemplate, Callable[[optuna.Study], Callable]]:
    from ris_stability.attach.script import check_runnable, parse_command
    from ris_stability.sweep.script_trial import ScriptSettings, make_script_objective
    from ris_stability.sweep.template import placeholders

    template = CommandTemplate.parse(opts.command)
    template.check(space.keys, space.source)
    cmd = parse_command(template.argv)
    if not placeholders(cmd.target):
        check_runnable(cmd)
    script = template.script_path()
    if opts.metric_check and not is_trace_metric(opts.metric) and not named_in_source(opts.metric, script):
        raise UsageError(f"--metric {opts.metric!r}: not a metric of the trace (loss, loss/TERM) and not named in "
                         f"{script}; report it from the script with ris_stability.report_metric("
                         f"{opts.metric!r}, value) or a final JSON line such as {{\"{opts.metric}\": 0.5}} on stdout "
                         "(--no-metric-check when the script builds the name elsewhere)")
    settings = ScriptSettings(opts.out_root, opts.rules, opts.metric, opts.storage, opts.study, opts.heartbeat_s,
                              opts.startup_trials, opts.report_every, opts.trial_reports, opts.tensorboard,
                              opts.mlflow)
    return template, lambda study: make_script_objective(template, space, settings)


def _check_target(opts: SweepOptions, space: SearchSpace) -> Callable[[optuna.Study], Callable]:
    target = load_target(opts.target, opts.config, opts.overrides, opts.steps)
    space.check(target.check)
    metrics = getattr(target, "metrics", None)  # optional in the protocol: targets written before it lack it
    if metrics is not None and opts.metric not in metrics:
        raise UsageError(f"--metric {opts.metric!r} is not a validation metric of target {opts.target!r}; "
                         f"available: {', '.join(metrics)}")
    settings = TrialSettings(opts.out_root, opts.rules, opts.metric, opts.trial_reports)
    return lambda study: make_objective(target, space, settings)


def prepare(opts: SweepOptions) -> tuple[SearchSpace, Callable[[optuna.Study], Callable], RDBStorage]:
    """Every check that needs no trial, in this order: space, command template or target, metric, storage,
    output folder. Returns the space, the objective factory and the opened storage."""
    space = load_space(opts.space)
    objective = _check_script(opts, space)[1] if opts.command else _check_target(opts, space)
    storage = open_storage(opts.storage, opts.heartbeat_s)
    try:
        opts.out_root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {str(opts.out_root)!r}: cannot create it ({err.strerror or err}); choose a writable "
                         "folder") from None
    return space, objective, storage


def run_sweep(opts: SweepOptions) -> tuple[int, optuna.Study]:
    """Run (or join) the study; returns (exit code, study). Usage errors raise UsageError before any trial."""
    own = not opts.batch  # this command's batch (a launched worker runs part of its parent's)
    if own:
        opts = SweepOptions(**{**opts.__dict__, "batch": uuid.uuid4().hex[:12]})
    space, objective, storage = prepare(opts)
    study = open_study(opts, space.to_dict(), storage)
    code = 0
    if opts.workers == 1:
        ran = run_worker(study, run_and_tell(study, objective(study)), opts.batch, opts.trials, opts.out_root,
                         opts.seed, make_sampler)
        log.info("%d trial(s) run by this worker", ran)
    else:
        def reload() -> optuna.Study:  # the launcher's own view of the study, to fail a dead worker's trial
            return optuna.load_study(study_name=opts.study, storage=open_storage(opts.storage, opts.heartbeat_s))

        code = launch([worker_command(opts.worker_argv(i)) for i in range(opts.workers)], reload)
        fail_stale(study)
    mine = batch_trials(study, opts.batch)
    done = [t for t in mine if t.state.is_finished()]
    if own and len(done) < opts.trials:
        log.error("%d of the %d trial(s) of this command did not finish (%d still %s); run the command again to "
                  "add them", opts.trials - len(done), opts.trials, len(mine) - len(done),
                  "running elsewhere or waiting" if len(mine) > len(done) else "not started")
        code = code or EXIT_WORKER_LOST
    log.info("study %s: %s", opts.study, study_counts(study))
    return code, study


def stored_settings(study: optuna.Study) -> dict[str, Any]:
    settings = study.user_attrs.get(SWEEP_ATTR)
    if settings is None:
        raise UsageError(f"study {study.study_name!r} was not made by risdiag sweep (no {SWEEP_ATTR} attribute)")
    return settings


__all__ = ["SweepOptions", "make_sampler", "open_study", "prepare", "run_sweep", "stored_settings", "study_counts"]
