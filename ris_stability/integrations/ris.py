"""The bridge between ris_stability's generic instruments and the ris_model pipeline.

This is one of the two modules that import ris_model (with cli.py). Each instrument keeps its glue in its
own clearly separated section below.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ris_model.complex_ops import complex_dtype
from ris_model.config import ConfigError, RunConfig, config_hash, dumps_toml, from_dict, load_config, replace
from ris_model.data import Batch, SimDataset
from ris_model.infer import Prediction, predict
from ris_model.loss import TERMS, CompositeLoss, LossInputs
from ris_model.model import build_model
from ris_model.parallel import local_only
from ris_model.simulate import make_system
from ris_model.train import NonFiniteError, train, validate
from ris_stability.instruments.alignment import (
    AlignmentError, AlignmentResult, check_alignment, default_rtol, one_thread, relative_difference,
)
from ris_stability.records.capsule import Capsule, CapsuleError, restore_rng
from ris_stability.monitor import distributed
from ris_stability.cli.live import LiveView
from ris_stability.locate.finding import Finding
from ris_stability.observe.loopstack import portable
from ris_stability.monitor import MonitorConfig, StabilityMonitor
from ris_stability.records import UsageError

log = logging.getLogger(__name__)

# =============================================================================================
# Alignment (issue 7): the matrices each loss term consumes vs the matrix inference feeds to MUSIC
# =============================================================================================

ALIGN_EXIT_ALIGNED, ALIGN_EXIT_MISALIGNED, ALIGN_EXIT_UNCHECKED = 0, 1, 2
_COV_NAMES = {"pred": "R_pred", "blend": "R_blend", "eff": "R_eff"}


@dataclass
class _LossSpy:
    """Records the LossInputs (hence THE builder's outputs) of every CompositeLoss call, per phase."""

    phase: str = ""
    seen: dict[str, LossInputs] = field(default_factory=dict)

    @contextmanager
    def attached(self, loss_fn: CompositeLoss) -> Iterator[None]:
        original = loss_fn.inputs  # CompositeLoss.forward calls self.inputs: shadow it on this instance only

        def inputs(outputs: Any, batch: Any) -> LossInputs:
            inp = original(outputs, batch)
            self.seen[self.phase] = inp
            return inp

        loss_fn.inputs = inputs
        try:
            yield
        finally:
            del loss_fn.inputs


def _term_consumers(loss_fn: CompositeLoss) -> dict[str, torch.nn.Module]:
    return {f"loss.{name}" + (" (w=0)" if loss_fn.weights[name] == 0 else ""): getattr(loss_fn, name)
            for name in TERMS}


def _validation_problems(val: LossInputs | None, pred: Prediction, cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Validation must build R_pred / R_blend / R_eff exactly as inference does on the same batch."""
    if val is None:
        return [f"validation ran no CompositeLoss, so its builder settings are unknown ({cfg.name})"], []
    problems = []
    for attr, name in _COV_NAMES.items():
        v, i = getattr(val.cov, attr), getattr(pred.cov, attr)
        diff = relative_difference(v, i)
        tol = default_rtol(i.shape[-1], i.dtype)
        if diff > tol:
            problems.append(f"validation builds {name} differently from inference: relative difference {diff:.3g} > "
                            f"{tol:.2g}; compare covariance settings of the loss and of predict()")
    note = f"validation and inference both build with {cfg.covariance}" if not problems else None
    return problems, [note] if note else []


def align_config(cfg: RunConfig, batch_size: int = 4) -> AlignmentResult:
    """Run the training loss, validation and inference of ``cfg`` on one validation batch (model in eval
    mode, untrained weights of ``cfg.train.seed``) and compare the matrices each loss term consumes with
    the one inference feeds to MUSIC; also check validation builds its covariances like inference.

    Matrices are named R_pred / R_blend / R_eff by identity with the builder's outputs of each path (by
    equality for MUSIC's complex128 copy).
    """
    system = make_system(cfg)
    device = torch.device(cfg.train.device)
    model = build_model(cfg, system).to(device).eval()
    loss_fn = CompositeLoss(cfg, system).to(device)
    batch: Batch = SimDataset(cfg, "val", size=batch_size, system=system).batch(list(range(batch_size))).to(device)
    spy, predictions = _LossSpy(), []

    def phase(name: str, fn):
        def run(b: Batch) -> Any:
            spy.phase = name
            return fn(b)
        return run

    def infer(b: Batch) -> Prediction:
        predictions.append(predict(cfg, model, b, system))
        return predictions[-1]

    def names() -> dict[str, list[torch.Tensor]]:
        covs = [inp.cov for inp in spy.seen.values()] + [p.cov for p in predictions]
        known: dict[str, Any] = {name: [getattr(c, attr) for c in covs] for attr, name in _COV_NAMES.items()}
        return {**known, "R_true": batch.R_true, "R_samp": batch.R_samp}

    # One batch of 144 x 144 factorisations: threads gain nothing and, on shared cores, cost 10-100x.
    with spy.attached(loss_fn), one_thread():
        result = check_alignment(
            {"train": phase("train", lambda b: loss_fn(model(b), b)),
             "val": phase("val", lambda b: validate(model, loss_fn, [b]))},
            infer, batch, roots={"model": model, "loss": loss_fn}, consumers=_term_consumers(loss_fn), names=names)
    problems, notes = _validation_problems(spy.seen.get("val"), predictions[0], cfg)
    if not result.aligned and cfg.loss.covariance == "pred":
        notes.append("likely cause: loss.covariance = \"pred\" makes the covariance terms consume R_pred while MUSIC "
                     "runs on R_eff (R_blend, shrunk if configured); next step: --set loss.covariance=blend")
    return result.merge(AlignmentResult((), tuple(notes), tuple(problems)))


def run_align(config_path: str, overrides: list[str], as_json: bool) -> tuple[int, str]:
    """`risdiag align`: (exit code, text to print). 0 aligned, 1 misaligned, 2 nothing could be compared.
    Config errors (ris_model.config.ConfigError) propagate to the CLI, which reports them as usage errors."""
    cfg = load_config(config_path, overrides)
    try:
        result = align_config(cfg)
    except AlignmentError as err:
        return ALIGN_EXIT_UNCHECKED, f"risdiag align {config_path}: cannot check: {err}"
    code = ALIGN_EXIT_ALIGNED if result.aligned else ALIGN_EXIT_MISALIGNED
    if as_json:
        return code, json.dumps({"config": config_path, "name": cfg.name, **result.to_dict()}, indent=2)
    head = f"risdiag align {config_path} (loss.covariance = {cfg.loss.covariance!r}, {cfg.covariance})"
    return code, head + "\n" + result.format_table()


# =============================================================================================
# Trace (issue 4): train a RunConfig with the StabilityMonitor attached; replay of its capsules (issue 5)
# =============================================================================================

REPLAYER = "ris_stability.integrations.ris:replay_capsule"


class ModelBuildError(UsageError):
    """The configuration is valid field by field but the model or loss cannot be built from it."""


def _resolve_out(out: str | None, config_path: str) -> Path:
    run_dir = Path(out) if out else Path("runs") / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {str(run_dir)!r}: cannot write there ({err.strerror or err}); "
                         "choose a writable folder, e.g. --out runs/my-run") from None
    return run_dir


def _check_buildable(cfg: RunConfig) -> None:
    try:
        system = make_system(cfg)
        build_model(cfg, system)
        CompositeLoss(cfg, system)
    except (ValueError, RuntimeError, TypeError) as err:
        raise ModelBuildError(f"config {cfg.name!r}: the model cannot be built: {err}. Check the [model] and "
                              "[geometry] sections (sizes must be positive and consistent)") from None


def batch_state(batch: Batch) -> dict[str, Any]:
    return {"split": batch.split, "tensors": batch.tensors()}


def _summary_table(cfg: RunConfig, run_dir: Path, mon: StabilityMonitor, result: Any, wall_s: float) -> Table:
    t = Table(title=f"risdiag trace: {cfg.name}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    losses = [h.loss for h in result.history] if result is not None else []
    t.add_row("steps", f"{len(losses)} of {cfg.train.steps}")
    t.add_row("wall time", f"{wall_s:.1f} s" + (f" ({result.step_time_s * 1e3:.0f} ms/step)" if result else ""))
    if losses:
        t.add_row("loss first / last", f"{losses[0]:.4g} / {losses[-1]:.4g}")
    if result is not None and result.val_history:
        step, val = result.val_history[-1]
        t.add_row("validation", f"loss {val['loss']:.4g}, K accuracy {val.get('k_acc', math.nan):.3f} (step {step})")
    style = "red bold" if mon.nonfinite_steps else "green"
    t.add_row("non-finite steps", Text(f"{len(mon.nonfinite_steps)} {mon.nonfinite_steps[:10]}", style=style))
    t.add_row("skipped steps", str(len(mon.skipped_steps)))
    if mon.capsules:
        t.add_row("capsules", ", ".join(str(p) for p in mon.capsules[:3]))
    t.add_row("run folder", str(run_dir))
    return t


# The pipeline's own switches for the generic report's remedies (ris_stability.report.look reads them).
RUN_REMEDIES = {"eigenvector": '`loss.eigh_backward = "gap_aware"`'}


def run_trace(config_path: str, overrides: list[str], steps: int | None, out: str | None, live: bool,
              every: int, max_matrices: int, report: bool, console: Console) -> int:
    """`risdiag trace`: train ``config_path`` with the monitor attached. Returns the exit code."""
    if steps is not None:
        overrides = [*overrides, f"train.steps={steps}"]
    cfg = load_config(config_path, overrides)
    _check_buildable(cfg)
    policy = "stop" if cfg.train.nonfinite == "stop" else "skip"
    mon_cfg = MonitorConfig(every=every, max_matrices=max_matrices, policy=policy)  # bad settings: no run folder
    run_dir = _resolve_out(out, config_path)
    text = dumps_toml(cfg)
    (run_dir / "config.resolved.toml").write_text(text)
    config_name = portable(str(config_path))  # no absolute path in a run folder
    meta = {"command": "risdiag trace " + " ".join([f"--config {config_name}", *(f"--set {o}" for o in overrides)]),
            "config_path": config_name, "config_hash": config_hash(cfg), "torch": str(torch.__version__),
            "device": cfg.train.device, "dtype": cfg.data.dtype, "remedies": RUN_REMEDIES}
    view = LiveView(total_steps=cfg.train.steps, enabled=live and distributed.launcher_rank() == 0)
    mon = StabilityMonitor(run_dir, mon_cfg, meta=meta,
                           config_text=text, replayer=REPLAYER, batch_state=batch_state, live=view)
    t0, result = time.perf_counter(), None
    with view:
        try:
            # the monitor's collective decision is the step's only all-reduce (the loop's own check stays local)
            result = train(cfg, callbacks=[mon, _ValidationToSinks()], out_dir=run_dir, agree=local_only)
        except NonFiniteError as err:
            log.error("run stopped: %s", err)
    if distributed.rank() == 0:  # one table and one report per run: rank 0 reads every rank's shard
        console.print(_summary_table(cfg, run_dir, mon, result, time.perf_counter() - t0))
        if report:
            from ris_stability.report.build import build_report

            console.print(f"report: {build_report(run_dir)}")
    # torchrun ends every rank once one exits non-zero: the others wait here until rank 0's report is written
    distributed.barrier()
    if distributed.rank() != 0:  # the verdict is collective: rank 0's exit code speaks for the run
        return 0
    return 1 if mon.nonfinite_steps else 0




@dataclass
class ReplayedStep:
    """A capsule's step rebuilt: ``loss()`` runs the forward of that step and returns the scalar loss."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    batch: Batch
    cfg: RunConfig
    roots: dict[str, torch.nn.Module]

    def loss(self) -> torch.Tensor:
        self.model.train()
        ctx = (torch.autocast(self.batch.y.device.type, dtype=getattr(torch, self.cfg.train.amp_dtype))
               if self.cfg.train.amp else contextlib.nullcontext())
        with ctx:
            outputs = self.model(self.batch)
        total, _ = self.loss_fn(outputs, self.batch)
        return total

    def annotate_finding(self, finding: Finding) -> Finding:
        """ris_model's words for the generic eigh remedy: the config key that applies the gap-aware backward."""
        if "eigh" not in finding.node.lower() or self.cfg.loss.eigh_backward == "gap_aware":
            return finding
        key = ('ris_model: set loss.eigh_backward = "gap_aware" in the config (--set loss.eigh_backward=gap_aware), '
               "the config form of the same fix for every eigenvector term")
        return dataclasses.replace(finding, remedies=finding.remedies[:1] + (key,) + finding.remedies[1:])


def replay_capsule(capsule: Capsule, dtype: str | None = None) -> ReplayedStep:
    """Rebuild the model, loss and batch of ``capsule`` (optionally in another dtype, e.g. "float64")."""
    try:
        cfg = from_dict(RunConfig, tomllib.loads(capsule.config_text))
    except (tomllib.TOMLDecodeError, ConfigError) as err:
        raise CapsuleError(f"capsule of step {capsule.step}: its stored config is unreadable ({err})") from None
    if dtype is not None:
        cfg = replace(cfg, data=replace(cfg.data, dtype=dtype), train=replace(cfg.train, amp=False))
    system = make_system(cfg)
    model = build_model(cfg, system)
    model.load_state_dict(capsule.model_state)
    loss_fn = CompositeLoss(cfg, system)
    batch = Batch(split=capsule.batch["split"], **capsule.batch["tensors"])
    if dtype is not None:
        real = getattr(torch, dtype)
        batch = batch.to(dtype=real)
        for module in (model, loss_fn):  # Module.to(dtype) would drop the imaginary part of complex tensors
            module._apply(lambda t: t.to(real) if t.is_floating_point() else t.to(complex_dtype(real)) if t.is_complex() else t)
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("capsule of step %d was recorded on %s; replaying on the CPU (results may differ)",
                    capsule.step, device)
        device = torch.device("cpu")
    model, loss_fn, batch = model.to(device), loss_fn.to(device), batch.to(device)
    restore_rng(capsule.rng)
    return ReplayedStep(model=model, loss_fn=loss_fn, batch=batch, cfg=cfg, roots={"model": model, "loss": loss_fn})


# =============================================================================================
# Sweep (issue 16): ris_model as the target of `risdiag sweep` (config keys, loading, the traced run)
# =============================================================================================


class _ValidationReporter:
    """Hands each intermediate validation to the sweep: the loop sets ctx.val after a step's callbacks,
    so it is seen at the next step's start (the final validation is the trial's result, not reported)."""

    def __init__(self, hooks: Any):
        self.hooks, self._seen = hooks, None

    def on_step_start(self, ctx: Any) -> None:
        if ctx.val is not None and ctx.val is not self._seen:
            self._seen = ctx.val
            self.hooks.report(ctx.step - 1, ctx.val, ctx)


class _ValidationToSinks(_ValidationReporter):
    """Each validation of a traced run also goes to the command's sinks (TensorBoard / MLflow) as val/NAME."""

    def __init__(self) -> None:
        super().__init__(self)

    def on_train_end(self, ctx: Any) -> None:  # the last validation, which no next step start sees
        if ctx.val is not None and ctx.val is not self._seen:
            self._seen = ctx.val
            self.report(ctx.step, ctx.val, ctx)

    def report(self, step: int, metrics: dict[str, float], ctx: Any = None) -> None:
        from ris_stability.sweep.metrics import report_metric

        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                report_metric(name, value, step)


class RisSweepTarget:
    """A RunConfig file plus fixed overrides; each trial adds its parameters as ``--set`` overrides."""

    def __init__(self, config_path: str, overrides: list[str], steps: int | None):
        from ris_stability.sweep.space import override_text

        self._text = override_text
        self.config_path = config_path
        self.overrides = [*overrides, *([f"train.steps={steps}"] if steps is not None else [])]
        cfg = self._load({})
        if not (cfg.train.val_every and cfg.data.n_val):
            raise UsageError(f"config {config_path!r}: the sweep's objective is a validation metric, but validation is "
                             f"off (train.val_every = {cfg.train.val_every}, data.n_val = {cfg.data.n_val}); set both > 0")
        self.name = cfg.name
        # what validate() returns: --metric is checked against these before any trial
        self.metrics = ("loss", *TERMS, "k_acc", "aux_matched", "aux_rmse_deg")

    def _load(self, params: dict[str, Any]) -> RunConfig:
        return load_config(self.config_path, [*self.overrides, *(self._text(k, v) for k, v in params.items())])

    def check(self, key: str, value: Any) -> None:
        try:
            self._load({key: value})
        except ConfigError as err:
            raise UsageError(str(err)) from None

    def resolved_toml(self, params: dict[str, Any]) -> str:
        return dumps_toml(self._load(params))

    def run(self, params: dict[str, Any], run_dir: Path, hooks: Any) -> dict[str, float]:
        cfg = self._load(params)
        _check_buildable(cfg)
        text = dumps_toml(cfg)
        sets = [*self.overrides, *(self._text(k, v) for k, v in params.items())]
        meta = {"command": "risdiag trace " + " ".join([f"--config {self.config_path}", *(f"--set {o}" for o in sets)]),
                "config_path": str(self.config_path), "config_hash": config_hash(cfg), "torch": str(torch.__version__),
                "device": cfg.train.device, "dtype": cfg.data.dtype}
        policy = "stop" if cfg.train.nonfinite == "stop" else "skip"
        mon = StabilityMonitor(run_dir, MonitorConfig(policy=policy), meta=meta, config_text=text, replayer=REPLAYER,
                               batch_state=batch_state, listeners=(hooks.observe,))
        try:
            result = train(cfg, callbacks=[mon, hooks, _ValidationReporter(hooks)], out_dir=run_dir, agree=local_only)
        except NonFiniteError as err:
            log.info("trial run %s stopped: %s", run_dir, err)
            return {}
        return dict(result.val_history[-1][1]) if result.val_history else {}


def sweep_target(config: str, overrides: list[str], steps: int | None) -> RisSweepTarget:
    """The factory `risdiag sweep` uses by default (``--target ris_stability.integrations.ris:sweep_target``)."""
    return RisSweepTarget(config, overrides, steps)
