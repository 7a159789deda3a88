"""`risdiag sweep` and `risdiag report --sweep`: the options, and the one line printed at the end."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

from rich.console import Console

from ris_stability.cli.logs import CLI_LOGGING, TOOLKIT
from ris_stability.integrations import PIPELINE_LOGGERS
from ris_stability.records import UsageError


def _optuna() -> None:
    try:
        import optuna
    except ImportError:
        raise UsageError("sweeps need optuna: pip install 'ris-diag[sweep]'") from None
    optuna.logging.disable_default_handler()  # its records go through this CLI's logging, like ours
    CLI_LOGGING.route("optuna", logging.WARNING)


def add_sweep_parser(sub: argparse._SubParsersAction, positive_int: Callable[[str], int],
                     nonnegative_int: Callable[[str], int], above_one: Callable[[str], float]) -> None:
    """``risdiag sweep`` (the integer / number types are the CLI's, so bad values exit 2 at parse time)."""
    s = sub.add_parser("sweep", help="Optuna study of traced runs with stability-aware pruning (needs the [sweep] extra): "
                       "your own script (-- python train.py --lr {lr}) or a config (--config)",
                       usage="risdiag sweep --space SPACE.toml --trials N --storage URL --study NAME [options] "
                             "(-- python train.py --lr {lr} ... | --config CONFIG [--target T])")
    s.add_argument("--space", required=True, help="search-space TOML, e.g. configs/space-quickstart.toml")
    s.add_argument("--trials", type=positive_int, required=True,
                   help="finished trials (complete, pruned or failed) this command delivers, over --workers")
    s.add_argument("--storage", required=True, help="Optuna RDB URL, e.g. sqlite:///runs/sweep.db or postgresql://...")
    s.add_argument("--study", required=True, help="study name; the same name and storage on another machine joins")
    s.add_argument("--config", default=None, help="config sweeps: TOML config, e.g. configs/quickstart.toml")
    s.add_argument("--steps", type=positive_int, default=None, help="config sweeps: training steps of each trial")
    s.add_argument("--workers", type=positive_int, default=1, help="worker processes on this machine (default 1)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config sweeps: fixed override of every trial's config (repeatable)")
    s.add_argument("--metric", default="loss",
                   help="objective (default loss): for a script, loss / loss/TERM from the trace, or a name it reports "
                        "(ris_stability.report_metric or a final JSON line); for a config, a validation metric")
    s.add_argument("--direction", default="minimize", choices=("minimize", "maximize"),
                   help="optimise the metric down or up (default minimize)")
    s.add_argument("--out", default=None, help="trial run folders go to OUT/trial-NNNN (default runs/sweep-STUDY)")
    s.add_argument("--seed", type=nonnegative_int, default=None,
                   help="sampler seed (each trial's draw also depends on the study's trial count: a resumed study "
                        "draws new parameters)")
    s.add_argument("--heartbeat", type=positive_int, default=10, help="seconds between trial heartbeats (stale after 3)")
    s.add_argument("--startup-trials", type=nonnegative_int, default=3, help="trials before the median pruner prunes")
    s.add_argument("--report-every", type=positive_int, default=10,
                   help="script sweeps with --metric loss / loss/TERM: report it to the median pruner every N steps "
                        "(each report is a write to the storage; default 10)")
    s.add_argument("--nonfinite-budget", type=nonnegative_int, default=0, help="non-finite steps a trial may have (default 0)")
    s.add_argument("--explode-factor", type=above_one, default=1e4, help="prune when |g| > FACTOR x its early median")
    s.add_argument("--no-tie-prune", action="store_true", help="do not prune on tied eigenvalues")
    s.add_argument("--no-trial-reports", action="store_true", help="skip each trial's report.md")
    s.add_argument("--target", default="ris_stability.integrations.ris:sweep_target",
                   help="config sweeps: factory module:function or file.py:function building the trained target")
    s.add_argument("--tensorboard", default=None, metavar="DIR", help="script sweeps: also write each trial to "
                   "TensorBoard under DIR/trial-NNNN")
    s.add_argument("--mlflow", action="store_true", help="script sweeps: also log each trial to MLflow")
    s.add_argument("--no-metric-check", action="store_true",
                   help="script sweeps: do not require --metric's name in the script's source before the first trial")
    s.add_argument("--batch", default="", help=argparse.SUPPRESS)  # set by the launcher for its workers
    s.add_argument("template", nargs=argparse.REMAINDER, help="-- python train.py [ARGS with {param} placeholders]")


def cmd_sweep_report(args: argparse.Namespace, console: Console) -> int:
    if args.sweep is None or args.study is None or args.run_dir is not None:
        raise UsageError("a sweep report takes --sweep STORAGE and --study NAME, and no run folder")
    _optuna()
    from ris_stability.sweep.report import build_sweep_report

    out = Path(args.out) if args.out else Path("runs") / f"sweep-{args.study}" / "report.md"  # beside its trials
    path = build_sweep_report(args.sweep, args.study, out)
    console.print(f"sweep report written to [bold]{path}[/bold]")
    return 0


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    _optuna()
    from ris_stability.sweep.command import SweepOptions, run_sweep, study_counts
    from ris_stability.sweep.pruning import StabilityRules

    logging.getLogger(TOOLKIT).setLevel(logging.WARNING)  # one line per trial, not every training step
    logging.getLogger(f"{TOOLKIT}.sweep").setLevel(logging.INFO)
    for name in PIPELINE_LOGGERS:
        CLI_LOGGING.route(name, logging.WARNING)
    command = args.template[1:] if args.template[:1] == ["--"] else args.template
    rules = StabilityRules(nonfinite_budget=args.nonfinite_budget, explode_factor=args.explode_factor,
                           prune_on_tie=not args.no_tie_prune)
    opts = SweepOptions(config=args.config, command=tuple(command), space=args.space, trials=args.trials,
                        storage=args.storage, study=args.study, steps=args.steps, workers=args.workers,
                        overrides=tuple(args.overrides), target=args.target, metric=args.metric,
                        direction=args.direction, out=args.out, seed=args.seed, heartbeat_s=args.heartbeat,
                        startup_trials=args.startup_trials, report_every=args.report_every,
                        trial_reports=not args.no_trial_reports, rules=rules,
                        batch=args.batch, tensorboard=args.tensorboard, mlflow=args.mlflow,
                        metric_check=not args.no_metric_check)
    code, study = run_sweep(opts)
    if not args.batch:  # the command the user typed (not one of its workers)
        counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(study_counts(study).items()))
        console.print(f"study [bold]{args.study}[/bold] ({args.storage}): {counts}; report: risdiag report --sweep "
                      f"{args.storage} --study {args.study}", highlight=False)
    return code


__all__ = ["add_sweep_parser", "cmd_sweep", "cmd_sweep_report"]
