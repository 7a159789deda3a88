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

import contextlib
import importlib.util
import json
import logging
import os
import runpy
import shlex
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ris_stability.attach.signals import FlushOnSignals, Terminated
from ris_stability.attach.watch import Watcher
from ris_stability.monitor import MonitorConfig, NonFiniteError, distributed
from ris_stability.records import UsageError
from ris_stability.records.folders import run_folder

log = logging.getLogger(__name__)

EXIT_OK, EXIT_NONFINITE, EXIT_USAGE, EXIT_SCRIPT_ERROR = 0, 1, 2, 4
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
    """Run the script as ``python`` would; the process-wide state it may set for itself (argv, sys.path[0],
    torch's anomaly mode) is put back afterwards, for callers that go on in the same process."""
    saved_argv, saved_path0 = sys.argv, sys.path[0] if sys.path else None
    anomaly = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
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
        torch.autograd.set_detect_anomaly(*anomaly)


def run_command(cmd: ScriptCommand) -> None:
    """Run ``cmd`` in this process as ``python`` would (``__main__``, ``sys.argv``, ``sys.path[0]``), with
    whatever hooks the caller installed: what ``trace_script`` runs under the monitor, and what ``risdiag
    locate`` re-runs up to a recorded bad step."""
    _run(cmd)


def user_traceback(exc: BaseException) -> str:
    """The exception's traceback as the script would show it under plain ``python``: the runner's frames
    before the script's first one, and every frame of this toolkit (its hooks sit between the script's
    ``loss.backward()`` and torch), left out; chained exceptions are shown the same way."""
    te = traceback.TracebackException.from_exception(exc)
    for part in _chain(te):
        frames = [f for f in part.stack if not _own(f.filename)]
        part.stack = traceback.StackSummary.from_list(frames)
    return "".join(te.format())


def _own(filename: str) -> bool:
    return filename.startswith("<frozen runpy") or os.path.abspath(filename).startswith(_OWN_DIRS)


def _chain(te: traceback.TracebackException):
    seen = set()
    while te is not None and id(te) not in seen:
        seen.add(id(te))
        yield te
        te = te.__cause__ or (te.__context__ if not te.__suppress_context__ else None)


def _config_text(cmd: ScriptCommand, options: Mapping[str, Any]) -> str:
    q = json.dumps  # a JSON string (and a JSON number or true) is a valid TOML value
    text = (f"[script]\ncommand = {q(cmd.text)}\nkind = {q(cmd.kind)}\ntarget = {q(cmd.target)}\n"
            f"args = [{', '.join(q(a) for a in cmd.args)}]\ncwd = {q(os.getcwd())}\n")
    if options:
        text += "\n[options]\n" + "".join(f"{k} = {q(v)}\n" for k, v in option_meta(options).items())
    return text


def option_meta(options: Mapping[str, Any]) -> dict[str, Any]:
    """``{"--gap-aware": True, "--every": 5}`` -> ``{"gap_aware": True, "every": 5}`` (meta.json, config)."""
    return {k.lstrip("-").replace("-", "_"): v for k, v in options.items()}


def recorded_command(head: str, options: Mapping[str, Any], tail: str = "") -> str:
    """The command that reproduces a run: ``head`` (e.g. ``risdiag trace``), every option that changes its
    numerics or control flow (``--gap-aware``, ``--on-nonfinite``, sinks ...; True: a bare flag), ``tail``."""
    flags = [k if v is True else f"{k} {shlex.quote(str(v))}" for k, v in options.items() if v not in (None, False)]
    return " ".join([head, *flags, *([tail] if tail else [])])


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


def trace_script(argv: Sequence[str], out: str | None = None, *, live: Any = None, config: MonitorConfig | None = None,
                 replayer: str = "", options: Mapping[str, Any] | None = None,
                 signals: FlushOnSignals | None = None, **settings: Any) -> ScriptRun:
    """Run the command under the monitor; never raises for the script's own errors (see ScriptRun). ``live``: a
    live view (a context manager with ``update``), ``config`` / ``settings``: what the monitor measures (see
    ``Watcher``); ``options``: the command-line options of the run (``{"--gap-aware": True, ...}``), recorded in
    meta.json, config.resolved.toml and the run's command. Bad settings are a usage error before any run
    folder is made. ``signals``: the termination signals' handler the caller entered (see attach.signals); a
    signal then ends the script with exit 128 + N and the run is flushed as ``terminated``."""
    from ris_stability.monitor import monitor_config

    config = monitor_config(config, **settings)
    cmd = parse_command(argv)
    check_runnable(cmd)
    run_dir = run_folder(out, cmd.stem)
    options = dict(options or {})
    text = _config_text(cmd, options)
    (run_dir / "config.resolved.toml").write_text(text)
    meta = {"command": recorded_command("risdiag trace", options, f"-- {cmd.text}"), "script": cmd.target,
            "script_kind": cmd.kind, "options": option_meta(options)}
    view = live if live is not None else contextlib.nullcontext()
    w = Watcher(run_dir, config=config, live=live, meta=meta, config_text=text, replayer=replayer)
    run = ScriptRun(EXIT_OK, w)
    with view:
        w.start()
        try:
            try:
                _run(cmd)
            finally:
                if signals is not None:
                    signals.flushing()  # the run is being written: a signal now lets it finish (attach.signals)
        except Terminated as exc:  # SIGTERM (or --flush-on): flushed as Ctrl-C, status terminated
            w.finish(exc)
            run.code = exc.exit_code
            run.message = (f"{exc.name} received: the run was flushed (step rows, events, summary, report) and is "
                           f"marked terminated; exit code {exc.exit_code}")
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


__all__ = ["EXIT_SCRIPT_ERROR", "ScriptCommand", "ScriptError", "ScriptRun", "check_runnable", "parse_command",
           "option_meta", "recorded_command", "run_command", "trace_script", "user_traceback"]
