"""`risdiag`: trace | locate | bisect | report | align | compare | sweep.

Exit codes: 0 success (a clean run, an aligned config, a located finding); 1 the run had non-finite
steps / the config is misaligned; 2 usage errors (bad config, bad path, corrupted files); 3 a capsule
that does not reproduce its non-finite step on replay; 4 the script traced by `risdiag trace -- python
SCRIPT.py` raised. User errors print one clear message, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console
from rich.markup import escape

from ris_stability.cli import locate_cmd
from ris_stability.cli.live import terminal_console
from ris_stability.cli.logs import CLI_LOGGING
from ris_stability.integrations import PIPELINE_LOGGERS
from ris_stability.cli.parsing import _Parser, _float_above, _one_line, nonnegative_int, positive_int  # noqa: F401

from ris_stability.records.capsule import CapsuleError
from ris_stability.monitor.config import POLICIES, MonitorConfig
from ris_stability.records import UsageError

EXIT_OK, EXIT_NONFINITE, EXIT_USAGE, EXIT_NOT_REPRODUCED = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="risdiag", description="Numerical-stability diagnostics for PyTorch training.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("trace", help="train with the stability monitor attached: a config of the built-in pipeline (--config) "
                       "or any PyTorch script (-- python SCRIPT.py [ARGS])",
                       usage="risdiag trace [options] (--config CONFIG | -- python SCRIPT.py [ARGS] | "
                             "-- python -m MODULE [ARGS])")
    t.add_argument("--config", default=None, help="TOML config, e.g. configs/quickstart.toml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=50 (repeatable)")
    t.add_argument("--steps", type=positive_int, default=None, help="number of training steps (overrides train.steps)")
    t.add_argument("--out", default=None, help="run folder (default runs/<config>-<time>)")
    t.add_argument("--gap-aware", action="store_true",
                   help="run inside ris_stability.gap_aware(): every torch.linalg.eigh / torch.linalg.svd / torch.svd "
                        "call uses the gap-aware backward (forwards unchanged)")
    t.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write scalars, incidents, findings and the report's figures to TensorBoard under DIR")
    t.add_argument("--mlflow", action="store_true",
                   help="also log metrics, params and the report to MLflow (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME)")
    t.add_argument("--wandb", action="store_true",
                   help="also log the same scalars, tables and figures to Weights & Biases (WANDB_PROJECT, "
                        "WANDB_MODE=offline; local files in WANDB_DIR or the run folder)")
    t.add_argument("--no-live", action="store_true", help="plain log lines instead of the live dashboard")
    t.add_argument("--flush-on", action="append", default=[], metavar="SIGNAL",
                   help="script runs: also flush the run (rows, summary, report; exit 128+N) on this signal, e.g. "
                        "SIGUSR1, which SLURM sends before the time limit (SIGTERM always flushes; repeatable)")
    t.add_argument("--every", type=positive_int, default=None,
                   help=f"record matrix statistics every N steps (default {MonitorConfig.every})")
    t.add_argument("--max-matrices", type=positive_int, default=None,
                   help=f"matrices of each batch the probes analyse (default {MonitorConfig.max_matrices})")
    t.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    t.add_argument("--on-nonfinite", choices=POLICIES, default=None,
                   help="script runs: what to do with a non-finite step: skip it (default; parameters and optimizer "
                        "state unchanged), stop after locating it, or observe (let the optimizer step)")
    t.add_argument("--on-explosion", choices=POLICIES, default=None,
                   help="what to do with a catastrophic finite gradient (one-step growth beyond 1e6x, a norm whose "
                        "square overflows, an SGD update larger than the parameters; docs/explosions.md): observe "
                        "(default: an event and a capsule), skip it (parameters and optimizer state unchanged) or stop")
    t.add_argument("--replayer", default="", metavar="MODULE:FUNCTION",
                   help="script runs: replayer stored in the capsules for `risdiag bisect` (see README)")
    t.add_argument("script", nargs=argparse.REMAINDER, help="-- python SCRIPT.py [ARGS] (or -- python -m MODULE)")

    b = sub.add_parser("bisect", help="replay a crash capsule (or a run folder) and name the failing op")
    b.add_argument("target", help="a capsule file (capsules/step_NNNNNN.pt) or a run folder")
    b.add_argument("--json", action="store_true", help="print the finding as JSON")
    b.add_argument("--float64", action="store_true", help="also replay in float64: precision or structure?")
    b.add_argument("--export", default=None, metavar="DIR", help="write a standalone reproducer to DIR")
    b.add_argument("--replayer", default=None, metavar="MODULE:FUNCTION",
                   help="rebuild the step with this function instead of the one the capsule names (module path "
                        "or FILE.py:function); needed for capsules of `risdiag trace -- python SCRIPT.py`")
    b.add_argument("--precision", action="store_true",
                   help="audit the step's gradient against float64 instead (finite steps too): which op's "
                        "precision changes it")

    r = sub.add_parser("report", help="build report.md and figures from a run folder (or a sweep's study)")
    r.add_argument("run_dir", nargs="?", default=None, help="a run folder written by `risdiag trace` (or watch)")
    r.add_argument("--out", default=None, help="report file (default RUN_DIR/report.md; for a sweep runs/sweep-STUDY/report.md)")
    r.add_argument("--sweep", default=None, metavar="STORAGE", help="report a sweep: its storage URL (with --study)")
    r.add_argument("--study", default=None, help="the sweep's study name (with --sweep)")

    c = sub.add_parser("compare", help="side-by-side report of several runs")
    c.add_argument("runs", nargs="+", help="2 to 4 run folders")
    c.add_argument("--out", default=None, help="output folder (default runs/compare-<names> in the working directory)")
    c.add_argument("--labels", nargs="*", default=None, help="one name per run for tables and legends "
                   "(default the folder names)")

    a = sub.add_parser("align", help="check that the loss and inference consume the same matrices")
    a.add_argument("--config", required=True, help="TOML config, e.g. configs/seed-misaligned.toml")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set section.key=value (repeatable)")
    a.add_argument("--json", action="store_true", help="print the check as JSON")
    from ris_stability.cli.sweep import add_sweep_parser

    add_sweep_parser(sub, positive_int, nonnegative_int, _float_above(1.0))
    locate_cmd.add_parser(sub)
    return p


def _cmd_trace_script(args: argparse.Namespace, console: Console) -> int:
    from ris_stability.attach.script import trace_script
    from ris_stability.attach.signals import FlushOnSignals, signal_numbers
    from ris_stability.cli.live import LiveView
    from ris_stability.cli.script_summary import report_to
    from ris_stability.monitor import distributed

    given = [flag for flag, value in (("--config", args.config), ("--steps", args.steps), ("--set", args.overrides))
             if value]
    if given:
        raise UsageError(f"{', '.join(given)} apply to configs of the built-in pipeline, not to a script; pass the script's own "
                         "arguments after '--'")
    view = LiveView(total_steps=0, enabled=not args.no_live and distributed.launcher_rank() == 0)
    try:
        signums = signal_numbers(["SIGTERM", *args.flush_on])
    except ValueError as err:
        raise UsageError(str(err)) from None
    with FlushOnSignals(signums) as signals:  # SIGTERM flushes the run as Ctrl-C does (attach.signals)
        run = trace_script(args.script, args.out, live=view, replayer=args.replayer, options=_recorded_options(args),
                           signals=signals, **_monitor_settings(args))
        report_to(run, console, terminal_console(), report=not args.no_report)
    return run.code


def _monitor_settings(args: argparse.Namespace) -> dict:
    """The monitor settings given on the command line (the others keep MonitorConfig's defaults)."""
    given = {"every": args.every, "max_matrices": args.max_matrices, "on_nonfinite": args.on_nonfinite,
             "on_explosion": args.on_explosion}
    return {k: v for k, v in given.items() if v is not None}


def _recorded_options(args: argparse.Namespace) -> dict:
    """The given `trace` options that change the run's numerics or control flow, or where it is copied: written
    into meta.json and the run's command, so that re-running the recorded command reproduces the run."""
    given = {"--gap-aware": args.gap_aware, "--on-nonfinite": args.on_nonfinite,
             "--on-explosion": args.on_explosion, "--every": args.every,
             "--max-matrices": args.max_matrices, "--replayer": args.replayer, "--tensorboard": args.tensorboard,
             "--mlflow": args.mlflow}
    return {k: v for k, v in given.items() if v not in (None, False, "")}


def _gap_aware_option(cmd: Callable[[argparse.Namespace, Console], int]) -> Callable[[argparse.Namespace, Console], int]:
    """--gap-aware: the whole command (a config run or a script) runs inside ris_stability.gap_aware()."""
    @functools.wraps(cmd)
    def run(args: argparse.Namespace, console: Console) -> int:
        from ris_stability.spectral import gap_aware

        with gap_aware() if args.gap_aware else contextlib.nullcontext():
            return cmd(args, console)
    return run


def _sinks_option(cmd: Callable[[argparse.Namespace, Console], int]) -> Callable[[argparse.Namespace, Console], int]:
    """--tensorboard / --mlflow / --wandb: the runs of the command are also written there; reports published at the end."""
    @functools.wraps(cmd)
    def run(args: argparse.Namespace, console: Console) -> int:
        from ris_stability.sinks import open_sinks

        with open_sinks(tensorboard=args.tensorboard, mlflow=args.mlflow, wandb=args.wandb):
            return cmd(args, console)
    return run


@_sinks_option
@_gap_aware_option
def _cmd_trace(args: argparse.Namespace, console: Console) -> int:
    if args.script:
        return _cmd_trace_script(args, console)
    if not args.config:
        raise UsageError("trace needs --config CONFIG (a run of the built-in pipeline) or '-- python SCRIPT.py [ARGS]' (any script)")
    if args.on_nonfinite or args.replayer:
        raise UsageError("--on-nonfinite and --replayer apply to script runs ('-- python SCRIPT.py'); for a config "
                         "set train.nonfinite instead")
    from ris_stability.cli.live import LiveView
    from ris_stability.cli.script_summary import rows_table
    from ris_stability.integrations.ris import run_trace
    from ris_stability.monitor import distributed

    view = LiveView(total_steps=0, enabled=not args.no_live and distributed.launcher_rank() == 0)
    title = "risdiag trace " + args.config

    def announce(rows: list[tuple[str, str, str]]) -> None:
        console.print(rows_table(title, rows))

    return run_trace(config_path=args.config, overrides=args.overrides, steps=args.steps, out=args.out,
                     live=view, report=not args.no_report, announce=announce, options=_recorded_options(args),
                     **_monitor_settings(args))


def _cmd_bisect(args: argparse.Namespace, console: Console) -> int:
    from ris_stability.replay.bisect import run_bisect, run_precision

    if args.precision:
        return run_precision(args.target, as_json=args.json, console=console, replayer=args.replayer)
    return run_bisect(args.target, as_json=args.json, float64=args.float64, export=args.export, console=console,
                      replayer=args.replayer)


def _cmd_report(args: argparse.Namespace, console: Console) -> int:
    if args.sweep is not None or args.study is not None:
        return _cmd_sweep_report(args, console)
    if args.run_dir is None:
        raise UsageError("give a run folder (risdiag report RUN_DIR) or a sweep (risdiag report --sweep STORAGE "
                         "--study NAME)")
    from ris_stability.report.build import build_report

    path = build_report(Path(args.run_dir), Path(args.out) if args.out else None)
    console.print(f"report written to [bold]{path}[/bold]")
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from ris_stability.cli.compare_view import compare_and_show

    path = compare_and_show([Path(r) for r in args.runs], Path(args.out) if args.out else None, args.labels or None,
                            console)
    console.print(f"comparison written to [bold]{path}[/bold]")
    return EXIT_OK


def _cmd_align(args: argparse.Namespace, console: Console) -> int:
    from ris_stability.integrations.ris_align import run_align

    code, text = run_align(args.config, args.overrides, args.json)
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        console.print(text, highlight=False)
    return code


def _cmd_sweep_report(args: argparse.Namespace, console: Console) -> int:
    from ris_stability.cli.sweep import cmd_sweep_report

    return cmd_sweep_report(args, console)


def _cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from ris_stability.cli.sweep import cmd_sweep

    return cmd_sweep(args, console)


COMMANDS = {"trace": _cmd_trace, "bisect": _cmd_bisect, "report": _cmd_report, "compare": _cmd_compare,
            "align": _cmd_align, "sweep": _cmd_sweep, "locate": locate_cmd.run}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=False, soft_wrap=True)
    err = terminal_console()
    level = logging.DEBUG if args.verbose else logging.INFO
    CLI_LOGGING.install(level, err)
    if args.command != "trace" or getattr(args, "config", None):  # a config run logs the pipeline's records too
        for name in PIPELINE_LOGGERS:
            CLI_LOGGING.route(name, level)
    try:
        return COMMANDS[args.command](args, console)
    except (UsageError, CapsuleError, FileNotFoundError, PermissionError) as exc:
        # UsageError covers the settings of config objects too (SettingError): options added later inherit it.
        # Escaped: messages quote TOML tables such as [params."train.lr"], which rich would take for markup.
        err.print(f"[red bold]risdiag {args.command}: error:[/red bold] {escape(_one_line(exc))}", highlight=False,
                  soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]; the run folder keeps every step logged so far")
        return 130
    finally:
        CLI_LOGGING.remove()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "nonnegative_int", "positive_int", "EXIT_OK", "EXIT_NONFINITE", "EXIT_USAGE", "EXIT_NOT_REPRODUCED"]
