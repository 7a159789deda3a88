"""StabilityMonitor: spectral probes + gradient monitor + trace files + crash capsules, attached from outside.

It fits a training loop's callback protocol structurally (methods named ``on_*`` taking the loop's context) and
works around any other loop through the same methods with a small context object, or as a plain context
manager. It only observes: statistics come from detached tensors, nothing consumes RNG, and the only
influence it has on the run is the configured non-finite policy (``ctx.request_skip`` / ``request_stop``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ris_stability.records.capsule import capture_rng, restore_rng, rng_state
from ris_stability.records.step_rng import StepRng
from ris_stability.monitor import amp
from ris_stability.monitor import distributed
from ris_stability.instruments.grads import TOTAL_KEY, GradMonitor
from ris_stability.observe import guard
from ris_stability.observe.loopstack import COMPILE_LIMITATION, compiled_parts, optimizers_of, run_meta, unwrap
from ris_stability.instruments.spikes import SpikeDetector
from ris_stability.instruments.probe import SpectralProbe
from ris_stability.records import TraceWriter
from ris_stability.linalg.hazards import vector_words
from ris_stability.monitor.config import SPIKE_WARMUP, MonitorConfig, suspect_site
from ris_stability.monitor.context import LoopContext, NonFiniteError
from ris_stability.monitor.explosions import ExplosionChecks
from ris_stability.monitor.step_reads import StepReads
from ris_stability.monitor.writing import MonitorWriting

log = logging.getLogger(__name__)


class StabilityMonitor(MonitorWriting, ExplosionChecks, StepReads):
    """Observe a training run and write a trace folder.

    ``batch_state(batch) -> dict`` turns a batch into capsule content; ``config_text`` is stored in
    capsules; ``replayer`` ("module:function") tells ``risdiag bisect`` how to rebuild the step.
    ``listeners``: callables ``(kind, record)`` that receive every step row ("step") and event ("event")
    as it is written (see TraceWriter).
    """

    def __init__(self, run_dir: str | Path, cfg: MonitorConfig = MonitorConfig(), *, meta: dict | None = None,
                 config_text: str = "", replayer: str = "", batch_state: Callable[[Any], dict] | None = None,
                 live: Any = None, listeners: tuple[Callable[[str, dict], None], ...] = ()):
        self.run_dir = Path(run_dir)
        self.listeners = tuple(listeners)
        self.rows_each_step = False  # a listener judges each step as it ends: its row is read then (attach)
        self.cfg, self.meta, self.config_text, self.replayer = cfg, dict(meta or {}), config_text, replayer
        self.batch_state = batch_state or (lambda b: {"batch": b})
        self.live = live
        self.writer: TraceWriter | None = None
        self.probe: SpectralProbe | None = None
        self.grads: GradMonitor | None = None
        self.nonfinite_steps: list[int] = []
        self.spike_steps: list[int] = []
        self.audit_fn: Callable[[], torch.Tensor] | None = None  # recomputes the step's loss (precision audit)
        self.spikes = SpikeDetector(cfg.spike_factor, cfg.spike_window, SPIKE_WARMUP)
        self.init_explosions()  # judged from step 0 (monitor/explosions.py)
        self.init_reads()  # one host read per read point (monitor/step_reads.py)
        self.skipped_steps: list[int] = []
        self.capsules: list[Path] = []  # kept capsules (the budget deletes the middle ones: writing.py)
        self._capsule_store = None
        self.snapshots: list[Path] = []  # spike snapshots of finite steps (MonitorConfig.spike_snapshots)
        self._rng = StepRng()  # the RNG states at each step start (records/step_rng.py)
        self._sites: dict[str, dict[str, Any]] = {}
        self._flagged: set[tuple[str, str]] = set()
        self._t0 = time.perf_counter()
        self._losses: list[float] = []
        self._status = "clean"
        self._dtype = torch.float32
        self._model: torch.nn.Module | None = None
        self._amp_scale: float | None = None
        self._checked_step: int | None = None  # non-finite handling runs once per step (accumulation)
        self._scale = amp.ScaleWatch(collapse_steps=cfg.amp_collapse_steps)
        self.overflow = False  # this step's gradients overflowed under a GradScaler (the scaler skips it)
        self.limitations: list[str] = []
        self.dist: distributed.RankWatch | None = None  # under torch.distributed: local checks + collective decision
        self.early_watch: distributed.RankWatch | None = None  # attached before the monitor (see _attach_distributed)
        self._decision: distributed.Decision | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, loss_fn: torch.nn.Module | None = None,
               roots: dict[str, torch.nn.Module] | None = None) -> None:
        compiled = compiled_parts(model)
        views = distributed.active() and distributed.grads_are_bucket_views(model)
        model = self._model = unwrap(model)  # a torch.compile wrapper would prefix every name with _orig_mod
        if roots is None:
            roots = {"model": model} if loss_fn is None else {"model": model, "loss": loss_fn}
        self._dtype = self.explosions.dtype = next((p.dtype for p in model.parameters()), torch.float32)
        self.meta = {**run_meta(model), **self.meta}
        self._attach_distributed(model, capture=not views)
        follows = (self.live.record,) if hasattr(self.live, "record") else ()  # the live view logs incidents once
        self.writer = TraceWriter(self.run_dir, self.meta, listeners=self.listeners + follows)
        self.rows_each_step = any(getattr(getattr(f, "__self__", f), "each_step", False) for f in self.writer.listeners)
        guard.bind(self.run_dir, self.event)  # an instrument's own error: one event, a traceback file, part off
        # The probe stays installed for the whole run (installing swaps torch attributes, which flushes
        # Python's type caches) and records only from the start of a sampled step to after its backward.
        self.probe = SpectralProbe(roots=roots, every=1, max_matrices=self.cfg.max_matrices)
        self.probe.sampling = False
        self.probe.__enter__()
        self.grads = GradMonitor(model, depth=self.cfg.grad_depth, dead_after=self.cfg.dead_after)
        self.writer.event("run_start", "info", f"monitor attached (every={self.cfg.every}, policy={self.cfg.policy}, "
                          f"on_explosion={self.cfg.on_explosion})")
        if self.meta.get("process_group") is False:
            self.writer.event("no_process_group", "warning", distributed.no_group_message(self.meta["rank"],
                                                                                         self.meta["world_size"]))
        if compiled:
            self.limitations.append(f"torch.compile ({', '.join(p or 'model' for p in compiled)}): {COMPILE_LIMITATION}")
            self.writer.event("compiled_model", "warning", self.limitations[-1], parts=compiled)

    def _attach_distributed(self, model: torch.nn.Module, capture: bool) -> None:
        """Under a process group: this rank's shard folder, its local gradient watch; live view on rank 0."""
        if self.dist is not None:
            return
        if not distributed.active():
            r, world = distributed.launcher_rank(), distributed.launcher_world()
            if world > 1:  # started as one of several ranks, but no group joined: this rank trains alone
                self.run_dir = distributed.shard_dir(self.run_dir, r)
                self.meta.update(rank=r, world_size=world, process_group=False)
                self.live = self.live if r == 0 else None
            return
        if self.early_watch is not None:  # watched the step in progress since its backward (a traced script)
            self.dist, self.early_watch = self.early_watch, None
            self.dist.rename(model)
        else:
            self.dist = distributed.RankWatch()
            self.dist.attach(model, capture=capture)
        self.run_dir = distributed.shard_dir(self.run_dir, self.dist.rank)
        self.meta.update(rank=self.dist.rank, world_size=self.dist.world)
        if self.dist.rank != 0:
            self.live = None

    def detach(self, status: str | None = None) -> None:
        if self.dist is not None:
            self.dist.detach()
        if self.probe is not None and self.probe.active:
            self.probe.__exit__(None, None, None)
        self.probe = None
        if self.writer is not None:
            self.drain_capsules()  # capsules still being written: on disk, their events in the trace, before the summary
            self.flush_reads()  # rows and verdicts still on the device: nothing lost at the end, a crash or a signal
            broken = guard.unbind()
            finite = [x for x in self._losses if math.isfinite(x)]
            self.writer.summary({
                "steps": len(self._losses), "wall_s": time.perf_counter() - self._t0,
                "nonfinite_steps": self.nonfinite_steps, "skipped_steps": self.skipped_steps,
                "final_loss": self._losses[-1] if self._losses else None,
                "best_loss": min(finite) if finite else None, "status": status or self._status,
                "amp_overflow_steps": self._scale.overflow_steps, "limitations": self.limitations,
                "capsules_dropped": len(self._capsule_store.dropped) if self._capsule_store is not None else 0,
                **({"instrument_errors": broken} if broken else {})})
            self.writer.event("run_end", "info", f"run ended: {status or self._status}")
            self.writer.close()
            self.writer = None

    # -- loop callback protocol ------------------------------------------------------------------
    def on_train_start(self, ctx: LoopContext) -> None:
        self.attach(ctx.model, ctx.loss_fn, ctx.roots)

    def on_step_start(self, ctx: LoopContext) -> None:
        self._rng.start(check=self.cfg.sampled(ctx.step))
        self.overflow, self._amp_scale, self.exploded = False, None, False
        if self.dist is not None:
            self.dist.start_step(ctx.step)
            self._decision = None
        # a step run under the locator is not sampled: the probe's own statistics would pass its modes
        if self.cfg.sampled(ctx.step) and not ctx.locating:
            self.probe.set_signal_dim(ctx.signal_dims)
            self.probe.sampling = True

    def pause_sampling(self) -> None:
        """No matrix statistics for the rest of this step (the locator was armed in it)."""
        if self.probe is not None:
            self.probe.sampling = False

    def on_after_backward(self, ctx: LoopContext) -> None:
        """The gradients of this optimizer step are complete (after the last micro-batch's backward): the step's
        verdict and statistics in one host read, or, under observe on a step not sampled, none (step_reads.py)."""
        sampled = self.cfg.sampled(ctx.step)
        table = None
        if self.probe.sampling:  # vec_grad hooks have fired: backward is done
            table, records = self.probe.collect_later()
            self.probe.sampling = False  # validation and later calls are not training matrices
        scaler = ctx.scaler if amp.is_scaler(ctx.scaler) else None
        opts = optimizers_of(ctx)
        scale = amp.scale_tensor(scaler) if scaler is not None else 1.0
        if sampled:
            still_scaled = scaler is not None and not amp.unscaled(scaler, opts)
            self.grads.observe_grads(opts, count_nonfinite=False, scale=scale if still_scaled else 1.0)
        first, self._checked_step = self._checked_step != ctx.step, ctx.step
        flags = self.verdict_flags(ctx, grads_in_block=sampled)
        deferred = self.cfg.policy == "observe" and not sampled and first  # the same on every rank
        if deferred and ctx.grads_finite is None:
            self.defer_verdict(ctx, flags, scale if scaler is not None else None)
            ctx.grads_finite = True  # as far as this step knows: its verdict is read with the next sample
            return
        self.reads.add(flags, self.take_flags)
        collective = self.dist is not None and first and not deferred
        if collective:  # every rank takes the same decision: one small all-reduce, read with the rest
            self.reads.add(self.dist.reduce(ctx.loss), lambda values: setattr(
                self, "_decision", self.dist.decision(values)))
        if sampled:
            self.reads.add(self.grads.block(), self.grads.take_block)
        if table is not None:
            self.reads.add(table, lambda values: setattr(self, "_sites", records(values)))
        if isinstance(scale, torch.Tensor):
            self.reads.add(scale, lambda values: setattr(self, "_scale_value", values[0]))
        self.read_now(ctx.step)  # the step's one host read
        self.resolve_verdict(ctx)
        if collective:
            ctx.grads_finite = bool(ctx.grads_finite) and self._decision.ok
        finite = bool(ctx.grads_finite)
        if scaler is not None and first:
            self._amp_step(ctx, self._scale_value if isinstance(scale, torch.Tensor) else scale, finite)
        elif not finite and first:
            self._on_nonfinite(ctx)
        if finite and sampled and first:
            self._check_explosion(ctx)  # before the spike rule: an explosion's capsule serves both
            self._check_spike(ctx)

    def on_before_optimizer_step(self, ctx: LoopContext) -> None:
        if self._measures_update(ctx.step) and not ctx.skip_requested:
            self.grads.before_step(optimizers_of(ctx))

    def on_step_end(self, ctx: LoopContext) -> None:
        skipped = ctx.skipped
        if skipped:
            self.skipped_steps.append(ctx.step)
            self.writer.event("step_skipped", "warning", f"step {ctx.step} skipped ({ctx.skip_reason})",
                              step=ctx.step, reason=ctx.skip_reason)
        # no snapshot: the loop left the step before its update (an exception in forward, a loop's own skip)
        if self._measures_update(ctx.step) and not skipped and optimizers_of(ctx) and self.grads.snapshot_taken:
            self.grads.after_step(optimizers_of(ctx))
        ok = not skipped and ctx.step not in self.nonfinite_steps and not self.overflow
        if self.cfg.sampled(ctx.step):
            self.grads.settle(ok)  # liveness counts only steps that stepped with finite gradients
            if ok:
                self.grads.observe_terms(ctx.terms)
        self.collect_capsules()  # events of the capsules the background writer finished (writing.py)
        self.queue_row(ctx, skipped)  # read (and written) at the next read point: step_reads.py
        if self.dist is not None or self.rows_each_step:  # a rank may die with the next step; a pruner judges now
            self.read_now(ctx.step)

    def on_exception(self, ctx: LoopContext | None, exc: BaseException, stopped: bool | None = None) -> None:
        """The run ended on ``exc``: ``stopped`` (default: exc is a NonFiniteError) by the stop policy, else crashed."""
        self._status = "stopped" if (isinstance(exc, NonFiniteError) if stopped is None else stopped) else getattr(
            exc, "run_status", "crashed")  # "terminated": ended by a termination signal (attach.signals)
        lost = self.dist is not None and distributed.is_collective_failure(exc)
        msg = f"{type(exc).__name__}: {exc}"
        if lost:
            self._status = "rank_lost"
            msg = str(exc) if isinstance(exc, distributed.RankLostError) else distributed.rank_lost_message(
                self.dist.rank, ctx.step if ctx is not None else None, exc)
        elif self._status == "crashed" and isinstance(exc, Exception):  # e.g. an op refusing an inf input
            msg += self.trace_back_note(ctx.step if ctx is not None else None)
        if self.writer is not None:
            self.writer.event("run_stopped", "error", msg,
                              step=ctx.step if ctx is not None else None, **({"rank_lost": True} if lost else {}))
        self.detach()

    def on_train_end(self, ctx: LoopContext | None) -> None:
        if self.nonfinite_steps and self._status == "clean":
            self._status = "nonfinite"
        self.detach()

    # -- internals ----------------------------------------------------------------------------------
    def _measures_update(self, step: int) -> bool:
        """Update ratios are taken on logged steps that are also multiples of update_every."""
        return self.cfg.sampled(step) and step % self.cfg.update_every == 0

    def _amp_step(self, ctx: LoopContext, scale: float, finite: bool) -> None:
        """Under a GradScaler: an overflow is the scaler's routine (recorded, no capsule, no skip request:
        the scaler skips by itself); a scale that stays below 1 is an incident; a non-finite loss is a fault."""
        loss_finite = self._flags[0]  # read with the step's verdict
        self.overflow = not finite and loss_finite
        self._amp_scale = scale
        if self.overflow:
            self.writer.event("amp_overflow", "info", f"GradScaler overflow at step {ctx.step} (scale {scale:.6g}): "
                              "the scaler skips this step and lowers the scale", step=ctx.step, scale=scale)
        elif not finite:
            self._on_nonfinite(ctx, request=False)
        if self._scale.observe(ctx.step, scale, self.overflow):
            msg = self._scale.describe(scale)
            self._status = "nonfinite"
            self.writer.event("amp_scale_collapse", "error", msg, step=ctx.step, scale=scale,
                              overflow_steps=self._scale.overflow_steps)
            self._write_capsule(ctx, reason=msg)

    def _on_nonfinite(self, ctx: LoopContext, request: bool = True) -> None:
        step = ctx.step
        self.nonfinite_steps.append(step)
        if self.cfg.sampled(step):
            self.grads.count_nonfinite()
        loss_finite = ctx.loss is not None and bool(torch.isfinite(ctx.loss))
        kind = "nonfinite_grad" if loss_finite else "nonfinite_loss"
        suspect = suspect_site(self._sites, self._dtype)
        data: dict[str, Any] = {}
        msg = f"non-finite {'gradient' if loss_finite else 'loss'} at step {step}"
        if suspect is not None:  # only with evidence at this step (monitor/config.py)
            st = suspect["stats"]
            data = {"matrix": suspect["site"], "op": suspect["op"], "location": suspect["location"],
                    "module": suspect["module"], "vec_grad": suspect["vec_grad"], "evidence": suspect["evidence"],
                    "max_cluster": st.get("max_cluster"), "cluster_value": st.get("cluster_value"),
                    "min_gap": st.get("min_gap")}
            msg += (f"; suspect {suspect['site']} at {suspect['location']} ({suspect['evidence']}; its "
                    f"{vector_words(suspect['op'])} {'receive' if suspect['vec_grad'] else 'do not receive'} gradient)")
        bad = self.grads.nonfinite_parameters() if loss_finite else []
        born = ctx.born_names if ctx.born_names is not None else [
            n for n, g in (ctx.born_grads or {}).items() if not bool(torch.isfinite(g).all())]
        if born and not bad and loss_finite:  # non-finite at backward; the script made them finite since
            msg += (f"; non-finite gradients at backward (NaN/Inf entries in: {_names(born)}), replaced by the script "
                    "before optimizer.step")
            data.update(nonfinite_parameters=born, replaced_by_script=True)
        elif bad:  # "non-finite" is not "no gradient": name them in these words (see _report_dead)
            msg += f"; gradient non-finite (NaN/Inf entries) in: {_names(bad)}"
            data["nonfinite_parameters"] = bad
        msg += distributed.origin_note(self.dist, self._decision, data) + (self.trace_back_note(step) if step == self.nonfinite_steps[0] else "")
        self.writer.event(kind, "error", msg, step=step, **data)
        if self.live is not None:
            self.live.update(step, event=msg, nonfinite=True)
        if self.originates_fault():
            self._write_capsule(ctx, reason=msg)
        if not request:
            return
        if self.cfg.policy == "skip":
            ctx.request_skip("nonfinite")
        elif self.cfg.policy == "stop":
            ctx.request_skip("nonfinite")
            ctx.request_stop(msg)

    @property
    def last_decision(self) -> distributed.Decision | None:
        """Under DDP: the collective verdict of the step being checked (origin ranks, local finiteness)."""
        return self._decision

    def originates_fault(self) -> bool:
        """Whether this rank's own step reproduces this step's fault: always in one process; under DDP an
        originating rank, or rank 0 when no rank's local check saw it (e.g. a finite overflow in the
        reduction). Only such a rank writes a capsule or keeps a locator finding."""
        if self.dist is None or self._decision is None:
            return True
        return self.dist.rank in self._decision.origins or (not self._decision.origins and self.dist.rank == 0)

    def _check_spike(self, ctx: LoopContext) -> None:
        norms = self.grads.peek_norms()
        sites = {name: site["grad_norm"] for name, site in self._sites.items()
                 if isinstance(site.get("grad_norm"), float)}
        modules = {k: v for k, v in norms.items() if k != TOTAL_KEY}
        spike = self.spikes.observe(ctx.step, norms.get(TOTAL_KEY, math.nan), modules, sites)
        audit = self.audit_fn is not None and self.cfg.audit_every > 0 and ctx.step % self.cfg.audit_every == 0
        if spike is not None:
            self.spike_steps.append(ctx.step)
            msg = spike.message()
            if not self.exploded and len(self.snapshots) < self.cfg.spike_snapshots:  # a finite step: a snapshot
                path = self._write_capsule(ctx, reason=msg, purpose="spike")
                if path is not None:
                    msg += f"; snapshot {path.relative_to(self.run_dir)}"
                if path is not None and self.replayer:  # only with a replayer: --precision rebuilds the step from it
                    msg += f"; check the gradient with `risdiag bisect --precision {path}`"
            self.writer.event("gradient_spike", "warning", msg, step=ctx.step, **spike.data())
            if self.live is not None:
                self.live.update(ctx.step, event=msg)
            audit = audit or (self.audit_fn is not None and self.cfg.audit_on_spike)
        if audit:
            self.audit(self.audit_fn, step=ctx.step)

    def audit(self, fn: Callable[..., torch.Tensor], *args: Any, step: int | None = None, **kwargs: Any):
        """Precision audit of ``fn(*args, **kwargs)`` (the step's loss, recomputed from the step's RNG
        state) against float64; writes a ``precision_audit`` event and returns the audit."""
        from ris_stability.instruments.precision import audit_precision  # noqa: PLC0415 (only when auditing)
        outer = capture_rng()
        try:
            if self._rng.snapshot is not None:
                restore_rng(rng_state(self._rng.verified()[0]))
            result = audit_precision(fn, *args, roots=self.probe.roots if self.probe else None, **kwargs)
        finally:
            restore_rng(outer)
        if self.writer is not None:
            self.writer.event("precision_audit", "info" if result.ok else "warning",
                              f"precision audit at step {step}: {result.cause}", step=step, culprit=result.culprit,
                              baseline_error=result.baseline_error, remedies=list(result.remedies),
                              matrix=result.culprit or None)
        return result


def _names(names: list[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f" (+{len(names) - shown} more)" if len(names) > shown else "")
