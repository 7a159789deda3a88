"""`risdiag bisect`: replay a crash capsule bit-exactly, locate the first non-finite op, judge precision vs
structure in float64, export a standalone reproducer; on a run folder, find the first bad step first.

The capsule names its replayer ("module:function", written by the integration that traced the run), so
this module knows nothing of any particular model: a replayer returns an object with ``loss()`` (the
forward of the captured step, returning the scalar loss), ``roots`` (named modules) and ``model``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from ris_stability.records.capsule import Capsule, CapsuleError, restore_rng
from ris_stability.records.folders import writable_folder
from ris_stability.instruments.precision import PrecisionAudit, audit_precision, format_audit
from ris_stability.locate.finding import Finding
from ris_stability.locate import Locator
from ris_stability.records import FINDING_FILE, META_FILE, UsageError, read_trace
from ris_stability.records.atomic import write_text_atomic
from ris_stability.locate.reproducer import export_reproducer

log = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE, EXIT_NOT_REPRODUCED = 0, 2, 3


class NotReproducedError(Exception):
    """The replayed step is finite although the capsule recorded a non-finite one (exit code 3)."""


@dataclass
class ReplayOutcome:
    step: int
    loss: float
    grads_finite: bool
    bad_parameters: list[str]
    recorded_loss: float
    recorded_grads_finite: bool
    grads: dict[str, Tensor] = field(default_factory=dict, repr=False)
    recorded_grads: dict[str, Tensor] | None = field(default=None, repr=False)  # None: capsule stored none
    # the capsule kept the gradients after the script rewrote them in place (its first bad step): only the names
    # of those non-finite at backward can be compared
    recorded_born_nonfinite: list[str] | None = None

    @property
    def nonfinite(self) -> bool:
        return not (math.isfinite(self.loss) and self.grads_finite)

    @property
    def differences(self) -> list[str]:
        """What the replay did not reproduce bit for bit: loss, non-finite pattern, each gradient."""
        out = []
        if not _same_float(self.loss, self.recorded_loss):
            out.append(f"loss {self.loss!r} vs recorded {self.recorded_loss!r}")
        if self.grads_finite != self.recorded_grads_finite:
            out.append(f"gradients {'finite' if self.grads_finite else 'non-finite'} vs recorded "
                       f"{'finite' if self.recorded_grads_finite else 'non-finite'}")
        if self.recorded_born_nonfinite is not None:
            if sorted(self.bad_parameters) != sorted(self.recorded_born_nonfinite):
                out.append(f"non-finite gradients in {sorted(self.bad_parameters)} vs recorded at backward in "
                           f"{sorted(self.recorded_born_nonfinite)}")
            return out
        if self.recorded_grads is None:
            return out + ["the capsule stores no gradients to compare with"]
        for name in sorted(set(self.grads) | set(self.recorded_grads)):
            a, b = self.grads.get(name), self.recorded_grads.get(name)
            if a is None or b is None:
                out.append(f"gradient of {name} {'missing on replay' if a is None else 'not recorded'}")
            elif not same_bits(a, b):
                out.append(f"gradient of {name} differs")
        return out

    @property
    def bit_exact(self) -> bool:
        return not self.differences


def _same_float(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality of two tensors; NaNs compare by position (their payload is not kept by every op)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan_a, nan_b = a.isnan(), b.isnan()
    if not torch.equal(nan_a, nan_b):
        return False
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
    return torch.equal(a.masked_fill(nan_a, 0).contiguous().view(bits),
                       b.masked_fill(nan_b, 0).contiguous().view(bits))


@dataclass
class BisectResult:
    capsule: Path
    outcome: ReplayOutcome
    finding: Finding | None
    float64: dict[str, Any] | None = None
    exported: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        o = self.outcome
        return {"capsule": str(self.capsule), "step": o.step, "reproduced": o.nonfinite, "bit_exact": o.bit_exact,
                "replay": {"loss": o.loss if math.isfinite(o.loss) else None, "grads_finite": o.grads_finite,
                           "bad_parameters": o.bad_parameters[:20], "differences": o.differences[:20]},
                "finding": self.finding.to_dict() if self.finding else None, "float64": self.float64,
                "exported": self.exported}


def _replayer(capsule: Capsule) -> Callable[..., Any]:
    spec = capsule.meta.get("replayer", "")
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise CapsuleError(f"capsule of step {capsule.step} names no replayer (meta.replayer={spec!r}); pass one: "
                           "risdiag bisect CAPSULE --replayer module:function (see the README, 'Replaying later')")
    try:
        return getattr(_import_replayer_module(module), name)
    except (ImportError, AttributeError, OSError, SyntaxError) as err:
        raise CapsuleError(f"capsule replayer {spec!r} cannot be imported ({type(err).__name__}: {err})") from None


def _import_replayer_module(module: str) -> Any:
    """A dotted module (searched from the working directory too, as `python -m` does) or a FILE.py."""
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module).stem, module)
        if spec is None or spec.loader is None or not Path(module).is_file():
            raise ImportError(f"no file {module!r}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    return importlib.import_module(module)


@contextlib.contextmanager
def _capsule_threads(capsule: Capsule) -> Iterator[None]:
    """Run with the thread count the run used, then restore the process-wide setting."""
    # LAPACK's rounding (and so whether near-tied eigenvalues come out exactly equal) depends on the
    # thread count: replay with the one the run used.
    threads, before = capsule.meta.get("threads"), torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rebuild(capsule: Capsule, dtype: str | None) -> Any:
    return _replayer(capsule)(capsule, dtype)


def replay(capsule: Capsule, dtype: str | None = None) -> ReplayOutcome:
    """Rebuild the step and run forward + backward exactly as training did; report what came out."""
    with _capsule_threads(capsule):
        rep = _rebuild(capsule, dtype)
        rep.model.zero_grad(set_to_none=True)
        loss = rep.loss()
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in rep.model.named_parameters() if p.grad is not None}
    bad = [n for n, g in grads.items() if not bool(torch.isfinite(g).all())]
    return ReplayOutcome(step=capsule.step, loss=float(loss.detach()), grads_finite=not bad, bad_parameters=bad,
                         recorded_loss=float(capsule.meta.get("loss", math.nan)),
                         recorded_grads_finite=bool(capsule.meta.get("grads_finite", False)), grads=grads,
                         **_recorded_grads(capsule, dtype))


def _recorded_grads(capsule: Capsule, dtype: str | None) -> dict[str, Any]:
    """What the replay's gradients are compared with: the capsule's (as backward made them), or, when it kept them
    as the script had rewritten them (meta ``grads_at``), the names of those non-finite at backward."""
    if dtype is not None:
        return {"recorded_grads": None}
    if capsule.meta.get("grads_at") == "optimizer.step":
        return {"recorded_grads": None, "recorded_born_nonfinite": list(capsule.meta.get("born_nonfinite", []))}
    return {"recorded_grads": capsule.grads}


def locate_capsule(capsule: Capsule, dtype: str | None = None) -> Finding | None:
    with _capsule_threads(capsule):
        rep = _rebuild(capsule, dtype)
        rep.model.zero_grad(set_to_none=True)
        finding = Locator(roots=rep.roots).run(rep.loss)
    # A replayer may add its model's own words to the generic remedies (e.g. the config key of a fix).
    annotate = getattr(rep, "annotate_finding", None)
    return annotate(finding) if annotate is not None and finding is not None else finding


def float64_verdict(capsule: Capsule) -> dict[str, Any]:
    """Replay the step in float64: finite there means precision, non-finite means structure. A replay that
    fails (e.g. the model casts to float32 internally and a matmul meets a float64 tensor) is a verdict of its
    own; it never hides the float32 finding."""
    try:
        o64 = replay(capsule, dtype="float64")
    except Exception as exc:  # the user's code, in a dtype it may not support: any error is the answer
        line = (str(exc).strip().splitlines() or [""])[0]
        log.warning("float64 replay of step %d failed: %s: %s", capsule.step, type(exc).__name__, line)
        return {"loss": None, "grads_finite": None, "verdict": "float64 replay failed", "explanation": (
            f"float64 replay failed: {type(exc).__name__}: {line}. The float32 finding stands; likely cause: "
            "the model or loss casts to float32 itself (or the replayer cannot rebuild the step in float64). "
            "Next step: let the replayer cast those parts too, or judge precision with `risdiag bisect --precision`")}
    verdict = "structural" if o64.nonfinite else "precision"
    return {"loss": o64.loss if math.isfinite(o64.loss) else None, "grads_finite": o64.grads_finite,
            "verdict": verdict, "explanation": (
                "finite in float64: the failure is a precision problem (float32 rounding turns a "
                "near-degenerate spectrum into exact ties or overflow)" if verdict == "precision" else
                "non-finite in float64 too: the failure is structural (exact ties, log(0), 0/0 ...); "
                "more precision will not fix it")}


def bisect_capsule(path: Path, float64: bool = False, export: Path | None = None,
                   replayer: str | None = None) -> BisectResult:
    """``replayer`` ("module:function" or "FILE.py:function") overrides the one the capsule names."""
    capsule = Capsule.load(path)
    if replayer:
        capsule.meta["replayer"] = replayer
    outcome = replay(capsule)
    if not outcome.nonfinite:
        raise NotReproducedError(
            f"capsule {str(path)!r} (step {capsule.step}) replays finite: loss {outcome.loss:.6g}, all gradients "
            f"finite, whereas the run recorded loss {outcome.recorded_loss:.6g} with "
            f"{'finite' if outcome.recorded_grads_finite else 'non-finite'} gradients. Likely cause: a "
            "non-deterministic op or a different torch build/thread count; re-run the trace on this machine")
    finding = locate_capsule(capsule)
    result = BisectResult(capsule=path, outcome=outcome, finding=finding)
    if float64:
        result.float64 = float64_verdict(capsule)
    if export is not None and finding is not None:
        with _capsule_threads(capsule):
            rep = _rebuild(capsule, None)
            result.exported = [str(p) for p in export_reproducer(finding, rep, Path(export))]
    return result


def audit_capsule(path: Path, replayer: str | None = None) -> PrecisionAudit:
    """Precision audit of a capsule's step (finite or not): its gradient against float64. ``replayer``
    overrides the one the capsule names (script runs)."""
    capsule = Capsule.load(path)
    if replayer:
        capsule.meta["replayer"] = replayer
    with _capsule_threads(capsule):
        rep = _rebuild(capsule, None)
        rep.model.zero_grad(set_to_none=True)
        restore_rng(capsule.rng)
        return audit_precision(rep.loss, roots=rep.roots)


def _latest_capsule(run_dir: Path) -> Path:
    found = sorted((run_dir / "capsules").glob("step_*.pt")) or sorted((run_dir / "snapshots").glob("spike_*.pt"))
    if not found:
        raise UsageError(f"run folder {str(run_dir)!r} holds no capsule to audit; the monitor writes a crash capsule "
                         "on a non-finite step and a spike snapshot (snapshots/) on a finite gradient spike")
    return found[0]


def run_precision(target: str, as_json: bool, console: Console, replayer: str | None = None) -> int:
    """`risdiag bisect --precision`: audit the capsule (or a run folder's first capsule) against float64."""
    path = Path(target)
    if path.is_dir():
        path = _latest_capsule(path)
    audit = audit_capsule(path, replayer)
    if as_json:
        console.print_json(json.dumps({"capsule": str(path), **audit.to_dict()}, default=str))
    else:
        # soft_wrap=False: a piped console is 80 columns wide, and the panel's lines wrap inside it, never cropped.
        console.print(Panel(format_audit(audit), title=f"risdiag bisect --precision {path.name}",
                            border_style="green" if audit.ok else "red"), highlight=False, soft_wrap=False)
    return EXIT_OK


def first_bad_step(run_dir: Path) -> tuple[int, Path]:
    """The first step whose loss or gradients went non-finite, and its capsule."""
    trace = read_trace(run_dir)
    steps: list[int] = []
    if "nonfinite" in trace.steps.columns:
        steps += [int(s) for s in trace.steps.index[trace.steps["nonfinite"].fillna(False).astype(bool)]]
    steps += [int(e["step"]) for e in trace.events if e.get("kind") in ("nonfinite_loss", "nonfinite_grad")
              and e.get("step") is not None]
    if not steps:
        raise UsageError(f"run folder {str(run_dir)!r} recorded no non-finite step: nothing to bisect "
                         f"({len(trace.steps)} steps logged, all finite)")
    first = min(steps)
    path = run_dir / "capsules" / f"step_{first:06d}.pt"
    if not path.is_file():
        raise UsageError(f"step {first} of {str(run_dir)!r} went non-finite but has no capsule ({path.name} missing); "
                         "the monitor writes at most max_capsules capsules per run")
    for step in sorted(set(steps)):  # a capsule that does not load (cut by a kill, damaged) gives way to the next
        candidate = run_dir / "capsules" / f"step_{step:06d}.pt"
        if not candidate.is_file():
            continue
        try:
            Capsule.load(candidate)
        except CapsuleError as err:
            log.warning("skipped: %s", str(err).splitlines()[0])
            continue
        return step, candidate
    raise UsageError(f"no capsule of {str(run_dir)!r} loads (first non-finite step {first}); see the warnings above "
                     "for each; re-run the trace to write them again")


def _panel(result: BisectResult) -> Panel:
    f, o = result.finding, result.outcome
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("capsule", str(result.capsule))
    t.add_row("replay", f"step {o.step}: loss {o.loss:.6g}, gradients {'finite' if o.grads_finite else 'NON-FINITE'}"
              f" ({'bit-exact vs the recorded step' if o.bit_exact else 'NOT bit-exact: ' + '; '.join(o.differences[:3])})")
    if f is None:
        t.add_row("finding", "the locator saw no non-finite value (replay differs from the located run?)")
    else:
        for name in ("phase", "op", "node", "module", "location", "function", "cause", "culprit", "message"):
            value = getattr(f, name)
            if value:
                t.add_row(name, str(value))
            if name == "location" and len(f.stack) > 1:
                t.add_row("called from", " <- ".join(f.stack[1:4]))
        for s in f.inputs[:4]:
            spec = s.spectral
            extra = (f"; min gap {spec.get('min_gap', math.nan):.2e}, largest tied cluster "
                     f"{int(spec.get('max_cluster', 0) or 0)}" if spec else "")
            t.add_row("input", f"{s.name} {list(s.shape)} {s.dtype}, |max| {s.absmax}, nan {s.nan}, inf {s.inf}{extra}")
        for i, r in enumerate(f.remedies):
            t.add_row("remedy" if i == 0 else "", f"- {r}")
    if result.float64:
        verdict, why = result.float64["verdict"], result.float64["explanation"]
        t.add_row("float64", why if why.startswith(verdict) else f"{verdict}: {why}")  # said once
    for p in result.exported:
        t.add_row("exported", p)
    return Panel(t, title="risdiag bisect", border_style="red" if f else "yellow")


def _save_finding(result: BisectResult) -> None:
    run_dir = result.capsule.parent.parent
    if (run_dir / META_FILE).is_file() and result.finding is not None:
        write_text_atomic(run_dir / FINDING_FILE, json.dumps({**result.finding.to_dict(), "step": result.outcome.step}))


def run_bisect(target: str, as_json: bool, float64: bool, export: str | None, console: Console,
               replayer: str | None = None) -> int:
    path = Path(target)
    export_dir = writable_folder(export, "--export", "pass a writable folder for reproducer.pt and reproduce.py") \
        if export else None
    if not path.exists():
        raise UsageError(f"{target!r} does not exist; pass a capsule (RUN_DIR/capsules/step_NNNNNN.pt) or a run folder")
    if path.is_dir():
        _, path = first_bad_step(path)
    try:
        result = bisect_capsule(path, float64=float64, export=export_dir, replayer=replayer)
    except NotReproducedError as err:
        console.print(f"[yellow bold]risdiag bisect: did not reproduce:[/yellow bold] {err}", highlight=False)
        return EXIT_NOT_REPRODUCED
    _save_finding(result)
    if as_json:
        console.print_json(json.dumps(result.to_dict(), default=str))
    else:
        console.print(_panel(result), soft_wrap=False)  # wrapped in its panel when piped, never cropped
    return EXIT_OK


__all__ = ["audit_capsule", "run_precision", "same_bits", "bisect_capsule", "first_bad_step", "replay",
           "locate_capsule", "run_bisect", "BisectResult",
           "ReplayOutcome", "NotReproducedError", "UsageError"]
