"""`risdiag trace [options] -- python SCRIPT.py [ARGS]` and `-- python -m pkg.module [ARGS]`.

The script runs unmodified in this process, as ``python`` would run it (``runpy``: ``__name__ ==
"__main__"``, ``sys.argv``, ``sys.path[0]``), with the monitor attached by hooks (see
``ris_stability.attach``): the model roots are the modules that own the first stepping optimizer's
parameters, steps are its ``step()`` calls, the loss is what ``backward`` is called on.

Exit codes: 0 clean, 1 non-finite steps (or stopped by ``--on-nonfinite stop``), 2 usage (bad command,
missing script, syntax error, no optimizer step), 4 the script raised (its traceback is shown, the run is
marked ``crashed``), or the script's own ``sys.exit`` status.

Under ``torchrun --nproc-per-node N -m ris_stability.cli trace --out DIR -- python SCRIPT.py``: the script
joins its process group itself; the monitor attaches at its first optimizer step, when the group exists,
and from then on works as in ``ris_stability.monitor.distributed`` (per-rank shards, one collective decision per
step, origin ranks). Rank 0 alone shows the live view, prints the summary and writes the report, once the
other ranks have closed their shards; the non-finite verdict is collective, so rank 0's exit code speaks
for the run and the other ranks exit 0 on it.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import runpy
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ris_stability.monitor import distributed
from ris_stability.attach.driver import POLICIES, NonFiniteError
from ris_stability.attach.watch import Watcher, close_run
from ris_stability.cli.live import LiveView
from ris_stability.records import CAPSULE_DIR, UsageError, read_summary

log = logging.getLogger(__name__)

EXIT_OK, EXIT_NONFINITE, EXIT_USAGE, EXIT_SCRIPT_ERROR = 0, 1, 2, 4
SHOWN_CAPSULES = 3  # capsule paths in the summary table; the rest as "+N more"
_PYTHONS = ("python", "python3", f"python3.{sys.version_info.minor}")
_OWN_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
             os.path.dirname(os.path.abspath(runpy.__file__)) + os.sep + "runpy")


class ScriptError(UsageError):
    """The command after ``--`` cannot be run (not python, missing script or module, syntax error)."""


@dataclass(frozen=True)
class ScriptCommand:
    kind: str  # "path" or "module"
    target: str  # the script path or the module name
    args: tuple[str, ...]

    @property
    def text(self) -> str:
        head = self.target if self.kind == "path" else f"-m {self.target}"
        return " ".join(["python", head, *self.args])

    @property
    def stem(self) -> str:
        return Path(self.target).stem if self.kind == "path" else self.target.rpartition(".")[2]


def parse_command(argv: Sequence[str]) -> ScriptCommand:
    """``["python", "train.py", ...]``, ``["python", "-m", "pkg.mod", ...]`` or ``["train.py", ...]``."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv and (os.path.basename(argv[0]) in _PYTHONS or argv[0] == sys.executable):
        argv = argv[1:]
    if not argv:
        raise ScriptError("nothing to run after '--'; expected: risdiag trace [options] -- python SCRIPT.py [ARGS]")
    if argv[0] == "-m":
        if len(argv) < 2:
            raise ScriptError("'-m' needs a module name: risdiag trace -- python -m pkg.module [ARGS]")
        return ScriptCommand("module", argv[1], tuple(argv[2:]))
    if argv[0].startswith("-"):
        raise ScriptError(f"python option {argv[0]!r} is not supported after '--'; only SCRIPT.py or -m MODULE")
    return ScriptCommand("path", argv[0], tuple(argv[1:]))


def check_runnable(cmd: ScriptCommand) -> None:
    """Fail before any run folder is made: missing script or module, or a script that does not compile."""
    if cmd.kind == "module":
        saved = list(sys.path)
        sys.path.insert(0, os.getcwd())  # as `python -m` searches
        try:
            spec = importlib.util.find_spec(cmd.target)
        except (ImportError, ValueError) as err:
            raise ScriptError(f"module {cmd.target!r} cannot be found ({err}); run from the folder that holds "
                              "its package, as `python -m` would") from None
        finally:
            sys.path[:] = saved
        if spec is None:
            raise ScriptError(f"no module named {cmd.target!r} (searched from {os.getcwd()}); run from the folder "
                              "that holds its package, as `python -m` would")
        return
    path = Path(cmd.target)
    if not path.is_file():
        raise ScriptError(f"script {cmd.target!r} not found (working directory {os.getcwd()})")
    try:
        compile(path.read_bytes(), str(path), "exec")
    except SyntaxError as err:
        raise ScriptError(f"{cmd.target}:{err.lineno}: syntax error: {err.msg}; the script was not run") from None


def _run(cmd: ScriptCommand) -> None:
    saved_argv, saved_path0 = sys.argv, sys.path[0] if sys.path else None
    try:
        if cmd.kind == "path":
            sys.argv = [cmd.target, *cmd.args]
            sys.path[0] = os.path.dirname(os.path.abspath(cmd.target))
            runpy.run_path(cmd.target, run_name="__main__")
        else:
            sys.argv = [cmd.target, *cmd.args]
            sys.path[0] = os.getcwd()
            runpy.run_module(cmd.target, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None:
            sys.path[0] = saved_path0


def user_traceback(exc: BaseException) -> str:
    """The exception's traceback from the script's first frame on (the runner's frames dropped)."""
    tb = exc.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename.startswith("<frozen runpy")
                              or os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OWN_DIRS)):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _resolve_out(out: str | None, cmd: ScriptCommand) -> Path:
    run_dir = Path(out) if out else Path("runs") / f"{cmd.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {str(run_dir)!r}: cannot write there ({err.strerror or err}); "
                         "choose a writable folder, e.g. --out runs/my-run") from None
    return run_dir


def _config_text(cmd: ScriptCommand) -> str:
    q = json.dumps  # a JSON string is a valid TOML basic string
    return (f"[script]\ncommand = {q(cmd.text)}\nkind = {q(cmd.kind)}\ntarget = {q(cmd.target)}\n"
            f"args = [{', '.join(q(a) for a in cmd.args)}]\ncwd = {q(os.getcwd())}\n")


@dataclass
class ScriptRun:
    """What happened: the exit code, the watcher, the script's exception and its formatted traceback."""

    code: int
    watcher: Watcher
    error: BaseException | None = None
    traceback: str = ""
    message: str = ""
    rank: int = 0  # under torchrun: this process's rank and the group's size (as the monitor saw them)
    world: int = 1
    started: float = 0.0  # time.time() at the start (rank 0 waits for shards closed since then)


def trace_script(argv: Sequence[str], out: str | None = None, *, live: bool = False, every: int = 1,
                 max_matrices: int = 4, on_nonfinite: str = "skip", replayer: str = "") -> ScriptRun:
    """Run the command under the monitor; never raises for the script's own errors (see ScriptRun)."""
    if on_nonfinite not in POLICIES:
        raise UsageError(f"--on-nonfinite {on_nonfinite!r}: valid choices {', '.join(POLICIES)}")
    cmd = parse_command(argv)
    check_runnable(cmd)
    run_dir = _resolve_out(out, cmd)
    text = _config_text(cmd)
    (run_dir / "config.resolved.toml").write_text(text)
    meta = {"command": f"risdiag trace -- {cmd.text}", "script": cmd.target, "script_kind": cmd.kind}
    view = LiveView(total_steps=0, enabled=live and distributed.launcher_rank() == 0)
    w = Watcher(run_dir, on_nonfinite=on_nonfinite, every=every, max_matrices=max_matrices, live=view, meta=meta,
                config_text=text, replayer=replayer)
    run = ScriptRun(EXIT_OK, w, started=time.time())
    with view:
        w.start()
        try:
            _run(cmd)
        except NonFiniteError as exc:
            w.finish(exc)
            run.message = f"run stopped (--on-nonfinite stop): {exc}"
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            w.finish(exc if code else None)
            run.code, run.message = code, (f"the script exited with status {code}" if code else "")
        except KeyboardInterrupt as exc:
            w.finish(exc)
            raise
        except BaseException as exc:  # the script's own error: reported, not ours to re-raise
            w.finish(exc)
            run.code, run.error, run.traceback = EXIT_SCRIPT_ERROR, exc, user_traceback(exc)
            run.message = f"the script raised {type(exc).__name__}; the run is marked crashed"
        else:
            w.finish()
    if run.code == EXIT_OK:
        if w.status == "no_steps":
            run.code = EXIT_USAGE
            calls = w.driver.backward_calls
            run.message = (f"{cmd.text} ran to its end but never called optimizer.step() of a torch.optim optimizer"
                           + (f" ({calls} backward calls seen)" if calls else " (and never called backward)")
                           + ": nothing was monitored. For a hand-written update use ris_stability.MonitorSession")
        elif w.status in ("nonfinite", "stopped"):
            run.code = EXIT_NONFINITE
    return _ranked(run)


def _ranked(run: ScriptRun) -> ScriptRun:
    """This process's rank: under a process group a rank > 0 leaves the collective non-finite verdict to rank
    0; ranks a launcher started without a group have verdicts of their own, and keep their exit codes."""
    watch = run.watcher.monitor.dist
    if watch is None:
        run.rank, run.world = distributed.process_rank()
        return run
    run.rank, run.world = watch.rank, watch.world
    if run.rank != 0 and run.code == EXIT_NONFINITE:
        run.code = EXIT_OK
    return run


def summary_table(run: ScriptRun) -> Table:
    w = run.watcher
    t = Table(title=f"risdiag trace: {w.meta.get('command', '')}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("status", w.status)
    t.add_row("optimizer steps", str(w.steps))
    style = "red bold" if w.nonfinite_steps else "green"
    t.add_row("non-finite steps", Text(f"{len(w.nonfinite_steps)} {w.nonfinite_steps[:10]}", style=style))
    t.add_row("skipped steps", str(len(w.skipped_steps)))
    f = _shown_finding(run)
    if f is not None:
        rank = f" (rank {f['rank']})" if "rank" in f else ""
        t.add_row("finding" + rank, Text(f"step {f['step']}: phase {f.get('phase')}, {f.get('node') or f.get('op') or '-'} "
                                         f"in {f.get('module') or '-'} at {f.get('location') or '-'}", style="red"))
        t.add_row("cause", str(f.get("cause", "")))
        if f.get("remedies"):
            t.add_row("remedy", str(f["remedies"][0]))
    if w.nonfinite_steps and f is None:
        t.add_row("finding", "none: the fault did not recur in the armed steps; replay a capsule with "
                             "`risdiag bisect CAPSULE --replayer module:function`")
    if run.world > 1 and run.rank == 0:
        for r, shard in distributed.shard_dirs(w.run_dir).items():
            summary = read_summary(shard) if r else None
            if summary is not None:
                bad = summary.get("nonfinite_steps") or []
                t.add_row(f"rank {r}", f"{summary.get('status', '?')}, {summary.get('steps', '?')} steps, "
                                       f"non-finite {len(bad)} {bad[:10]}")
    capsules = _capsules(run)
    if capsules:
        more = f" (+{len(capsules) - SHOWN_CAPSULES} more)" if len(capsules) > SHOWN_CAPSULES else ""
        t.add_row("capsules", ", ".join(str(p) for p in capsules[:SHOWN_CAPSULES]) + more)
    t.add_row("run folder", str(w.run_dir))
    return t


def _capsules(run: ScriptRun) -> list[Path]:
    """This rank's capsules, then (rank 0 of a data-parallel run) every other rank's, from its shard."""
    found = list(run.watcher.monitor.capsules)
    if run.world > 1 and run.rank == 0:
        for r, shard in distributed.shard_dirs(run.watcher.run_dir).items():
            found += sorted((shard / CAPSULE_DIR).glob("*.pt")) if r else []
    return found


def report_to(run: ScriptRun, console: Console, err: Console, report: bool) -> None:
    """Print what happened (traceback, message, summary) and write report.md when the run was attached."""
    if run.traceback:
        err.print(run.traceback.rstrip(), highlight=False, markup=False, soft_wrap=True)
    if run.message:
        err.print(f"[bold]risdiag trace:[/bold] {run.message}", highlight=False, soft_wrap=True)

    def write(missing: list[int]) -> None:
        if missing:
            err.print(f"[bold]risdiag trace:[/bold] rank(s) {missing} did not close their shard; the report "
                      "shows what they wrote", highlight=False, soft_wrap=True)
        console.print(summary_table(run))
        if report and run.watcher.driver.attached:
            from ris_stability.report.build import build_report

            console.print(f"report: {build_report(run.watcher.run_dir)}")

    close_run(run.watcher, run.started, write)


def _shown_finding(run: ScriptRun) -> dict | None:
    """This rank's first finding, else (rank 0 of a data-parallel run) the lowest other rank's, from its shard."""
    w = run.watcher
    if w.findings:
        step, finding = w.findings[0]
        return {**finding.to_dict(), "step": step}
    if run.world > 1 and run.rank == 0:
        from ris_stability.report.ranks import shard_finding

        return shard_finding(w.run_dir)
    return None


__all__ = ["EXIT_SCRIPT_ERROR", "ScriptCommand", "ScriptError", "ScriptRun", "check_runnable", "parse_command",
           "report_to", "summary_table", "trace_script", "user_traceback"]
