"""The bridge between ris_stability's generic instruments and the ris_model pipeline.

With ris_align.py (the alignment check) these are the only modules of ris_stability that import ris_model.
Each instrument keeps its glue in its own clearly separated section below.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ris_model.complex_ops import complex_dtype
from ris_model.config import ConfigError, RunConfig, config_hash, dumps_toml, from_dict, load_config, replace
from ris_model.data import Batch
from ris_model.loss import TERMS, CompositeLoss
from ris_model.model import build_model
from ris_model.parallel import local_only
from ris_model.simulate import make_system
from ris_model.train import NonFiniteError, train
from ris_stability.records.capsule import Capsule, CapsuleError, restore_rng
from ris_stability.locate.finding import Finding
from ris_stability.observe.loopstack import portable
from ris_stability.attach.callbacks import LoopCallbacks
from ris_stability.attach.finish import finish_run
from ris_stability.attach.script import option_meta, recorded_command
from ris_stability.attach.watch import Watcher
from ris_stability.monitor import MonitorConfig, monitor_config
from ris_stability.records import UsageError
from ris_stability.records.folders import run_folder
from ris_stability.report.markdown import shortlist

log = logging.getLogger(__name__)


def config_errors_are_usage_errors(fn):
    """The pipeline's config errors reach the CLI as usage errors (one line, exit 2)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            raise UsageError(str(err)) from None
    return run


# =============================================================================================
# Trace (issue 4): train a RunConfig with the StabilityMonitor attached; replay of its capsules (issue 5)
# =============================================================================================

REPLAYER = "ris_stability.integrations.ris:replay_capsule"


class ModelBuildError(UsageError):
    """The configuration is valid field by field but the model or loss cannot be built from it."""


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


def _summary_rows(cfg: RunConfig, w: Watcher, result: Any, wall_s: float) -> list[tuple[str, str, str]]:
    """The end-of-run summary as (what, value, style) rows; the CLI draws them."""
    mon = w.monitor
    losses = mon._losses
    rows = [("steps", f"{len(losses)} of {cfg.train.steps}", ""),
            ("wall time", f"{wall_s:.1f} s" + (f" ({result.step_time_s * 1e3:.0f} ms/step)" if result else ""), "")]
    if losses:
        rows.append(("loss first / last", f"{losses[0]:.4g} / {losses[-1]:.4g}", ""))
    if result is not None and result.val_history:
        step, val = result.val_history[-1]
        rows.append(("validation", f"loss {val['loss']:.4g}, K accuracy {val.get('k_acc', math.nan):.3f} (step {step})", ""))
    summary = str(w.run_dir / "summary.json")
    rows.append(("non-finite steps", f"{len(mon.nonfinite_steps)}: {shortlist(mon.nonfinite_steps, 10, summary)}"
                 if mon.nonfinite_steps else "0", "red bold" if mon.nonfinite_steps else "green"))
    rows.append(("skipped steps", str(len(mon.skipped_steps)), ""))
    if mon.capsules:
        folder = Path(mon.capsules[0]).parent
        rows.append(("capsules", f"{len(mon.capsules)} in {folder}: "
                                 f"{shortlist((Path(p).name for p in mon.capsules), 4, str(folder))}", ""))
    rows.append(("run folder", str(w.run_dir), ""))
    return rows


# The pipeline's own switches for the generic report's remedies (ris_stability.report.look reads them).
RUN_REMEDIES = {"eigenvector": '`loss.eigh_backward = "gap_aware"`'}


def _policy(cfg: RunConfig) -> str:
    """The monitor's non-finite policy from the pipeline's own ``train.nonfinite`` setting."""
    return "stop" if cfg.train.nonfinite == "stop" else "skip"


def _watcher(cfg: RunConfig, run_dir: Path, meta: dict, text: str, mon_cfg: MonitorConfig, **kwargs: Any
             ) -> tuple[Watcher, LoopCallbacks]:
    """The run's watcher (no global hooks: the pipeline's callbacks feed its driver) and those callbacks."""
    w = Watcher(run_dir, config=mon_cfg, meta=meta, config_text=text, replayer=REPLAYER, batch_state=batch_state,
                hooks=False, locate=False, **kwargs).start()
    return w, LoopCallbacks(w.driver, stop_errors=(NonFiniteError,))


@config_errors_are_usage_errors
def run_trace(config_path: str, overrides: list[str], steps: int | None, out: str | None, live: Any, report: bool,
              announce: Callable[[list[tuple[str, str, str]]], None], options: dict[str, Any] | None = None,
              **settings: Any) -> int:
    """`risdiag trace --config`: train ``config_path`` with the monitor attached. Returns the exit code.
    ``live``: the live view (or None); ``announce(rows)``: shows the summary (rank 0, once per run);
    ``settings``: MonitorConfig fields (the policy comes from the config's ``train.nonfinite``)."""
    if steps is not None:
        overrides = [*overrides, f"train.steps={steps}"]
    cfg = load_config(config_path, overrides)
    _check_buildable(cfg)
    mon_cfg = monitor_config(None, **settings, policy=_policy(cfg))  # bad settings: no run folder
    run_dir = run_folder(out, Path(config_path).stem)
    text = dumps_toml(cfg)
    (run_dir / "config.resolved.toml").write_text(text)
    config_name = portable(str(config_path))  # no absolute path in a run folder
    options = dict(options or {})
    meta = {"command": recorded_command("risdiag trace", options, " ".join([f"--config {config_name}",
                                                                           *(f"--set {o}" for o in overrides)])),
            "config_path": config_name, "config_hash": config_hash(cfg), "torch": str(torch.__version__),
            "device": cfg.train.device, "dtype": cfg.data.dtype, "remedies": RUN_REMEDIES,
            "options": option_meta(options)}
    if cfg.loss.eigh_backward == "gap_aware":  # the config applies the fix itself: never recommend it again
        meta["options"]["gap_aware"] = True
    if live is not None:
        live.total_steps = cfg.train.steps
    w, callbacks = _watcher(cfg, run_dir, meta, text, mon_cfg, live=live)
    t0, result, error = time.perf_counter(), None, None
    with live if live is not None else contextlib.nullcontext():
        try:
            # the monitor's collective decision is the step's only all-reduce (the loop's own check stays local);
            # progress is the live view's (one line per interval), so the loop logs only validation
            result = train(cfg, callbacks=[callbacks, _ValidationToSinks()], out_dir=run_dir, agree=local_only,
                           progress=False)
        except NonFiniteError as err:
            error = err
            log.error("run stopped: %s", err)
        except BaseException as err:
            finish_run(w, err, report=report)
            raise
    finish_run(w, error, report=report, stopped=callbacks.stopped(error),
               announce=lambda missing: announce(_summary_rows(cfg, w, result, time.perf_counter() - t0)))
    if w.monitor.dist is not None and w.monitor.dist.rank != 0:  # the verdict is collective: rank 0's speaks
        return 0
    return 1 if w.monitor.nonfinite_steps else 0


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
        w, callbacks = _watcher(cfg, run_dir, meta, text, MonitorConfig(policy=_policy(cfg)), listeners=(hooks.observe,))
        error: BaseException | None = None
        try:
            result = train(cfg, callbacks=[callbacks, hooks, _ValidationReporter(hooks)], out_dir=run_dir,
                           agree=local_only)
        except NonFiniteError as err:
            error = err
            log.info("trial run %s stopped: %s", run_dir, err)
            return {}
        except BaseException as err:
            error = err
            raise
        finally:
            finish_run(w, error, report=False, stopped=callbacks.stopped(error))
        return dict(result.val_history[-1][1]) if result.val_history else {}


@config_errors_are_usage_errors
def sweep_target(config: str, overrides: list[str], steps: int | None) -> RisSweepTarget:
    """The factory `risdiag sweep` uses by default (``--target ris_stability.integrations.ris:sweep_target``)."""
    return RisSweepTarget(config, overrides, steps)
