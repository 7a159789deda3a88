"""`risdiag locate RUN_DIR`: the finding of a traced script's first bad step without a replayer.

A fault that does not recur (one corrupt record, one unlucky batch) leaves no finding in the traced run: the
locator is armed only in the steps after it. Re-running the recorded command (config.resolved.toml's
``[script]``: kind, target, args, working directory; meta.json's options such as ``--gap-aware``) in this
process reaches the same step again when the script is deterministic from its command line. The re-run
carries no monitor: a :class:`StepDriver` fed by the same hooks as ``risdiag trace`` counts the steps exactly
as the traced run did, with a stand-in monitor that measures nothing (cost ~ the plain steps up to the bad
one, plus one loss read-back per step), and arms the in-process locator at the bad step.

Before believing the re-run, it is checked against the record: the loss of every step the trace logged
(bit for bit), the parameters at the bad step (the digest of the capsule's model state) and the step's
gradients (bit for bit against the capsule's). The first difference ends the re-run and is the answer:
the step where the re-run diverged and what to do (seed the script, or write a replayer).

The script runs as it did under trace: it writes its own files (logs, checkpoints) again, up to the bad step.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ris_stability.attach.driver import StepDriver
from ris_stability.attach.hooks import AutoAttach
from ris_stability.attach.script import ScriptCommand, check_runnable, run_command, user_traceback
from ris_stability.locate.finding import Finding
from ris_stability.monitor.config import MonitorConfig
from ris_stability.monitor.context import LoopContext
from ris_stability.observe.loopstack import unwrap
from ris_stability.records import UsageError, append_event, read_trace, write_finding
from ris_stability.records.capsule import Capsule, CapsuleError, capsule_path, state_digest
from ris_stability.records.capsule_writer import wait_all
from ris_stability.replay.bisect import same_bits
from ris_stability.replay.first_step import FirstStep

log = logging.getLogger(__name__)

CONFIG_FILE = "config.resolved.toml"


class _Stop(BaseException):
    """Ends the re-run from inside the script's step (not an Exception: a script's ``except Exception``
    must not swallow it)."""


@dataclass
class Recorded:
    """What a script run's folder says about its first bad step."""

    run_dir: Path
    command: ScriptCommand
    cwd: Path
    step: int
    losses: dict[int, float]  # logged loss per step, as the trace wrote it
    capsule: Capsule | None = None
    capsule_file: Path | None = None
    gap_aware: bool = False
    threads: int | None = None

    @property
    def digest(self) -> str | None:
        """The capsule's parameter digest (stored at write time; computed from its model state otherwise)."""
        if self.capsule is None:
            return None
        return self.capsule.meta.get("params_digest") or state_digest(self.capsule.model_state)


@dataclass
class RerunResult:
    step: int  # the recorded bad step the re-run aimed at
    finding: Finding | None = None
    reached: bool = False
    steps_run: int = 0
    diverged_at: int | None = None
    divergence: str = ""  # what differed, in words
    params_match: bool | None = None  # None: no capsule to compare with
    grads_bit_exact: bool | None = None
    grad_differences: list[str] = field(default_factory=list)
    script_error: str = ""  # the script's own exception or exit status, when it ended the re-run

    @property
    def located(self) -> bool:
        return self.finding is not None and self.diverged_at is None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "reached": self.reached, "steps_run": self.steps_run,
                "diverged_at": self.diverged_at, "divergence": self.divergence, "params_match": self.params_match,
                "grads_bit_exact": self.grads_bit_exact, "grad_differences": self.grad_differences[:20],
                "script_error": self.script_error}


def recorded(run_dir: Path) -> Recorded:
    """Read the recorded command and the first bad step; a folder that is not a traced script run, or that
    has no bad step, is a usage error saying what to do instead."""
    run_dir = Path(run_dir).resolve()
    trace = read_trace(run_dir)
    config = run_dir / CONFIG_FILE
    script = tomllib.loads(config.read_text()).get("script") if config.is_file() else None
    if not script:
        raise UsageError(f"{run_dir} is not a run of `risdiag trace -- python SCRIPT.py` (no [script] in "
                         f"{CONFIG_FILE}; command {trace.meta.get('command', '?')!r}): `risdiag locate` re-runs a "
                         "script's recorded command; for a run with a replayer use `risdiag bisect RUN_DIR`")
    if trace.meta.get("world_size", 1) > 1 or trace.meta.get("rank"):
        raise UsageError(f"{run_dir} is one rank of a data-parallel run: `risdiag locate` re-runs one process; "
                         "write a replayer and run `risdiag bisect CAPSULE --replayer module:function` on the "
                         "originating rank's capsule")
    bad = trace.nonfinite_steps
    if not bad:
        raise UsageError(f"{run_dir} recorded no non-finite step ({len(trace.steps)} steps logged): nothing to locate")
    step = bad[0]
    losses = {int(s): float(v) for s, v in trace.steps["loss"].items()} if "loss" in trace.steps else {}
    cap_file = capsule_path(run_dir, step)
    wait_all()  # a capsule this process is still writing (a run finished in-process just before): on disk first
    capsule = None
    if cap_file.is_file():
        try:
            capsule = Capsule.load(cap_file)
        except CapsuleError as err:
            log.warning("%s; the re-run is checked by its losses only", err)
    cmd = ScriptCommand(script["kind"], script["target"], tuple(script.get("args", ())))
    cwd = Path(script.get("cwd") or run_dir.parent)
    if not cwd.is_dir():
        raise UsageError(f"the run's working directory {str(cwd)!r} ({CONFIG_FILE}, [script] cwd) no longer exists: "
                         "`risdiag locate` re-runs the command from there; restore it, or edit cwd in that file")
    options = trace.meta.get("options") or {}
    threads = (capsule.meta.get("threads") if capsule is not None else None) or trace.meta.get("threads")
    return Recorded(run_dir=run_dir, command=cmd, cwd=cwd, step=step,
                    losses=losses, capsule=capsule, capsule_file=cap_file if capsule is not None else None,
                    gap_aware=bool(options.get("gap_aware")), threads=int(threads) if threads else None)


def _same_float(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))


class _Observer:
    """The monitor's side of the driver during a re-run: no probe, no files; checks the re-run against the
    record at each step and stops it at the bad step or at the first difference."""

    dist = None
    early_watch = None
    overflow = False
    exploded = False
    last_decision = None

    def __init__(self, rec: Recorded, result: RerunResult, run_dir: Path):
        self.rec, self.result, self.run_dir = rec, result, run_dir
        self.cfg = MonitorConfig()  # the driver reads its policies; nothing is measured
        self.found_late: list[int] = []  # the driver takes late verdicts from a monitor; a re-run has none

    def trace_back_note(self, step: int | None) -> str:
        return ""  # no explosion is watched in a re-run

    def on_train_start(self, ctx: LoopContext) -> None:
        pass

    def pause_sampling(self) -> None:
        pass

    def on_step_start(self, ctx: LoopContext) -> None:
        if ctx.step != self.rec.step:
            return
        self.result.reached = True
        digest = self.rec.digest
        if digest is not None:  # before the armed forward: the parameters the step starts from
            self.result.params_match = state_digest(unwrap(ctx.model).state_dict()) == digest

    def on_after_backward(self, ctx: LoopContext) -> None:
        ctx.grads_finite = True  # nothing is skipped: every step before the bad one was finite in the run
        if ctx.step != self.rec.step:
            return
        self.result.steps_run = ctx.step + 1
        cap = self.rec.capsule
        if cap is not None and cap.grads is not None:
            # what the capsule kept: the gradients as backward made them when the script replaced them since
            if ctx.born_grads is None and ctx.born_grads_fn is not None:  # the driver's copies, asked for now
                ctx.born_grads = ctx.born_grads_fn()[1]
            grads = ctx.born_grads if ctx.born_grads is not None else {
                n: p.grad for n, p in unwrap(ctx.model).named_parameters() if p.grad is not None}
            diffs = [f"gradient of {n} {'missing in the re-run' if n not in grads else 'differs'}"
                     for n, g in cap.grads.items() if n not in grads or not same_bits(grads[n], g)]
            diffs += [f"gradient of {n} not in the capsule" for n in grads if n not in cap.grads]
            self.result.grads_bit_exact, self.result.grad_differences = not diffs, diffs
        raise _Stop

    def on_before_optimizer_step(self, ctx: LoopContext) -> None:
        pass

    def on_step_end(self, ctx: LoopContext) -> None:
        self.result.steps_run = ctx.step + 1
        recorded_loss = self.rec.losses.get(ctx.step)
        if recorded_loss is None or ctx.loss is None or ctx.step >= self.rec.step:
            return
        loss = float(ctx.loss.detach())
        if not _same_float(loss, recorded_loss):
            self.result.diverged_at = ctx.step
            self.result.divergence = f"loss {loss!r} in the re-run, {recorded_loss!r} in the recorded run"
            raise _Stop

    def on_exception(self, ctx: Any, exc: BaseException, stopped: bool | None = None) -> None:
        pass

    def on_train_end(self, ctx: Any) -> None:
        pass

    def event(self, kind: str, severity: str, message: str, *, nonfinite: bool = False, **data: Any) -> None:
        log.debug("re-run %s: %s", kind, message)

    def originates_fault(self) -> bool:
        return True


class _AimedDriver(StepDriver):
    """The trace's step driver, arming the locator at one step (the recorded bad one)."""

    def __init__(self, observer: _Observer, step: int):
        super().__init__(observer, max_findings=1)  # type: ignore[arg-type]  (a monitor stand-in)
        self.target = step
        self.first_bad = step
        self._aimed = False

    def arm_pending(self) -> None:
        if not self._aimed and self.attached and self.step == self.target:  # the bad step's forward is next
            self._aimed = True
            self.arm_locator()
        super().arm_pending()


def rerun(rec: Recorded) -> RerunResult:
    """Re-run the recorded command in this process up to its bad step (see the module docstring)."""
    result = RerunResult(step=rec.step)
    saved_cwd, saved_threads = os.getcwd(), torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="risdiag-locate-") as scratch:
        driver = _AimedDriver(_Observer(rec, result, Path(scratch)), rec.step)
        # step 0 comes before the first optimizer step, where the driver learns the model: armed by its own hooks
        hooks = AutoAttach(driver) if rec.step > 0 else FirstStep(rec, result, _Stop)
        try:
            os.chdir(rec.cwd)
            check_runnable(rec.command)
            if rec.threads:  # LAPACK's rounding depends on the thread count: the run's own
                torch.set_num_threads(rec.threads)
            with _gap_aware(rec.gap_aware):
                driver.open()
                hooks.install()
                try:
                    run_command(rec.command)
                except _Stop:
                    pass
                except SystemExit as exc:
                    if exc.code not in (None, 0):
                        result.script_error = f"the script exited with status {exc.code}"
                except Exception as exc:  # the script's own error: the answer when it happened at the bad step
                    if _raised_by_us(exc):
                        raise
                    result.script_error = user_traceback(exc).strip().splitlines()[-1]
                finally:
                    hooks.remove()
                    driver.close()
                    driver.keep_pending_finding()
        finally:
            os.chdir(saved_cwd)
            torch.set_num_threads(saved_threads)
    result.steps_run = max(result.steps_run, driver.step)
    if driver.findings:
        result.finding = driver.findings[0][1]
    _judge(rec, result)
    return result


def _raised_by_us(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is the toolkit's own (a bug of the re-run, not the script's error)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    where = Path(tb.tb_frame.f_code.co_filename).resolve()
    # the locator's modes run the script's own ops: an op's error raised there is the script's
    return where.is_relative_to(_PACKAGE) and not where.is_relative_to(_PACKAGE / "locate")


_PACKAGE = Path(__file__).resolve().parents[1]


def _gap_aware(active: bool) -> contextlib.AbstractContextManager:
    if not active:
        return contextlib.nullcontext()
    from ris_stability.spectral import gap_aware

    return gap_aware()


def _judge(rec: Recorded, result: RerunResult) -> None:
    """Name the first difference from the record (a diverged loss is already named)."""
    if result.diverged_at is not None:
        return
    if not result.reached:
        result.diverged_at = result.steps_run
        result.divergence = (f"the re-run ended after {result.steps_run} step(s), before step {rec.step}"
                             + (f" ({result.script_error})" if result.script_error else ""))
    elif result.params_match is False:
        result.diverged_at = rec.step
        result.divergence = (f"the parameters at step {rec.step} differ from the capsule's, although every logged "
                             "loss before it matched")
    elif result.finding is None:
        result.diverged_at = rec.step
        result.divergence = (f"step {rec.step} came out finite in the re-run"
                             + ("" if result.params_match is None else " from the same parameters"))
    elif result.grads_bit_exact is False:
        log.warning("step %d was located, but its gradients are not bit-exact with the capsule's: %s", rec.step,
                    "; ".join(result.grad_differences[:3]))


def divergence_message(rec: Recorded, result: RerunResult) -> str:
    """What to do when the re-run did not reproduce the run."""
    return (f"the re-run of `{rec.command.text}` diverged from the recorded run at step {result.diverged_at}: "
            f"{result.divergence}. The script is not deterministic from its command line: likely an unseeded "
            "data order or initialisation, or a nondeterministic op. Next step: seed it (torch.manual_seed, "
            "numpy and random, the DataLoader's generator and workers; torch.use_deterministic_algorithms(True)) "
            "and trace again, then `risdiag locate` that run; or write a replayer (docs/script.md, 'Replaying "
            "later') and run `risdiag bisect CAPSULE --replayer module:function`")


def record(rec: Recorded, result: RerunResult) -> None:
    """Write the outcome into the original run folder: finding.json and a ``finding`` event when located, a
    ``locate_diverged`` event otherwise (the caller rebuilds report.md)."""
    rerun_data = result.to_dict()
    if result.located:
        f = result.finding
        source = f"risdiag locate (re-run of the recorded command, locator armed at step {rec.step})"
        write_finding(rec.run_dir, {**f.to_dict(), "step": rec.step, "first_nonfinite_step": rec.step,
                                    "source": source, "rerun": rerun_data})
        where = " ".join(x for x in (f.node or f.op, f.module and f"in {f.module}", f.location and f"at {f.location}")
                         if x)
        append_event(rec.run_dir, "finding", "error", f"finding (step {rec.step}, by re-run): phase {f.phase}, {where}: "
                     f"{f.cause}", step=rec.step, first_nonfinite_step=rec.step, source=source,
                     finding=f.to_dict(), rerun=rerun_data)
    else:
        append_event(rec.run_dir, "locate_diverged", "warning", divergence_message(rec, result),
                     step=result.diverged_at, rerun=rerun_data)


__all__ = ["Recorded", "RerunResult", "divergence_message", "record", "recorded", "rerun"]
