"""`risdiag sweep`: check the space against the config, open (or join) the study, run the workers."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from ris_stability.records import UsageError
from ris_stability.sweep.pruning import StabilityRules
from ris_stability.sweep.space import load_space
from ris_stability.sweep.storage import SWEEP_ATTR, check_settings, fail_stale, open_storage
from ris_stability.sweep.target import DEFAULT_TARGET, load_target
from ris_stability.sweep.trial import TrialSettings, make_objective
from ris_stability.sweep.workers import launch, run_worker, shares, worker_command

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepOptions:
    config: str
    space: str
    trials: int
    storage: str
    study: str
    steps: int | None = None
    workers: int = 1
    overrides: tuple[str, ...] = ()
    target: str = DEFAULT_TARGET
    metric: str = "loss"
    direction: str = "minimize"
    out: str | None = None  # trial run folders go to OUT/trial-NNNN (default runs/sweep-STUDY)
    seed: int | None = None  # TPE seed (worker i uses seed + i)
    heartbeat_s: int = 10
    startup_trials: int = 3  # trials the median pruner waits for before it prunes
    trial_reports: bool = True
    rules: StabilityRules = field(default_factory=StabilityRules)

    def __post_init__(self) -> None:
        for name, value, low in (("--trials", self.trials, 1), ("--workers", self.workers, 1),
                                 ("--steps", self.steps, 1), ("--startup-trials", self.startup_trials, 0)):
            if value is not None and value < low:
                raise UsageError(f"{name} {value}: must be >= {low}")
        if self.direction not in ("minimize", "maximize"):
            raise UsageError(f"--direction {self.direction!r}: choose minimize or maximize")

    @property
    def out_root(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"sweep-{self.study}"

    def worker_argv(self, trials: int, index: int) -> list[str]:
        """The ``risdiag sweep`` arguments of worker ``index`` running ``trials`` trials."""
        r = self.rules
        argv = ["sweep", "--config", self.config, "--space", self.space, "--trials", str(trials), "--storage",
                self.storage, "--study", self.study, "--workers", "1", "--target", self.target, "--metric",
                self.metric, "--direction", self.direction, "--out", str(self.out_root), "--heartbeat",
                str(self.heartbeat_s), "--startup-trials", str(self.startup_trials), "--nonfinite-budget",
                str(r.nonfinite_budget), "--explode-factor", repr(r.explode_factor)]
        argv += [] if self.steps is None else ["--steps", str(self.steps)]
        argv += [] if self.seed is None else ["--seed", str(self.seed + index)]
        argv += [] if self.trial_reports else ["--no-trial-reports"]
        argv += [] if r.prune_on_tie else ["--no-tie-prune"]
        for o in self.overrides:
            argv += ["--set", o]
        return argv

    def settings(self, space: dict[str, Any]) -> dict[str, Any]:
        """What the study remembers (report, joining workers)."""
        return {"target": self.target, "config": self.config, "overrides": list(self.overrides), "steps": self.steps,
                "space": space, "metric": self.metric, "direction": self.direction, "out": str(self.out_root),
                "heartbeat_s": self.heartbeat_s,
                "rules": {k: v for k, v in asdict(self.rules).items() if isinstance(v, (int, float, str, bool))}}


def open_study(opts: SweepOptions, space: dict[str, Any], seed: int | None) -> optuna.Study:
    storage = open_storage(opts.storage, opts.heartbeat_s)
    study = optuna.create_study(
        storage=storage, study_name=opts.study, direction=opts.direction, load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=opts.startup_trials))
    check_settings(study, opts.settings(space))
    return study


def study_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def run_sweep(opts: SweepOptions) -> tuple[int, optuna.Study]:
    """Run (or join) the study; returns (exit code, study). Config and space errors raise UsageError
    before any trial starts."""
    target = load_target(opts.target, opts.config, opts.overrides, opts.steps)
    space = load_space(opts.space)
    space.check(target.check)
    study = open_study(opts, space.to_dict(), opts.seed)
    code = 0
    if opts.workers == 1:
        settings = TrialSettings(opts.out_root, opts.rules, opts.metric, opts.trial_reports)
        run_worker(study, make_objective(target, space, settings), opts.trials)
    else:
        counts = [n for n in shares(opts.trials, opts.workers) if n]
        code = launch([worker_command(opts.worker_argv(n, i)) for i, n in enumerate(counts)])
        fail_stale(study)
    log.info("study %s: %s", opts.study, study_counts(study))
    return code, study


def stored_settings(study: optuna.Study) -> dict[str, Any]:
    settings = study.user_attrs.get(SWEEP_ATTR)
    if settings is None:
        raise UsageError(f"study {study.study_name!r} was not made by risdiag sweep (no {SWEEP_ATTR} attribute)")
    return settings


__all__ = ["SweepOptions", "run_sweep", "open_study", "study_counts", "stored_settings"]
