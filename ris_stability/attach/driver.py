"""StepDriver: the one driver every front door feeds. It owns the run's typed LoopContext, turns a loop's
events into StabilityMonitor calls, takes the step's decision (skip / stop) in one place and arms the
locator for the steps after a fault. Front doors: global hooks (``risdiag trace -- python ...``, ``watch``,
the HF Trainer callback; ``hooks.py``: a root module's forward starts the step, ``backward`` gives the loss,
the optimizer's pre-step hook checks it, :meth:`before_optimizer_step`, and its post-step hook ends it);
explicit calls (``MonitorSession``: :meth:`start_step`, :meth:`add_loss`, :meth:`check_step`,
:meth:`before_update`, :meth:`end_step`); a loop's callback protocol (Lightning, a pipeline's ``callbacks=``).

Skipping a step we do not drive: the gradients of the optimizer's parameters are hidden (``.grad =
None``) for the duration of ``optimizer.step()`` and put back afterwards. torch.optim optimizers update
neither a parameter nor its state (momentum, Adam's step counter and moments) when its gradient is None.

The finding without a replayer: after a non-finite step the locator is armed for the next step(s) of the
same script (under skip those still hold the pre-fault parameters); the first armed step whose forward
or backward goes non-finite again yields the finding. A fault that never recurs leaves none.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from torch import Tensor, nn

from ris_stability.locate.anomaly import anomaly_finding
from ris_stability.locate.armed import ArmedLocator
from ris_stability.locate.finding import Finding, format_finding
from ris_stability.monitor import StabilityMonitor
from ris_stability.monitor.context import LoopContext, NonFiniteError
from ris_stability.observe.loopstack import unwrap
from ris_stability.observe.guard import guarded
from ris_stability.observe.scaler import ScalerSpy
from ris_stability.records import write_finding
from ris_stability.attach.born import BornCheck
from ris_stability.attach.loop_parts import _lr, model_of, optimizer_params

log = logging.getLogger(__name__)

LOCATE_ATTEMPTS = 3  # armed steps tried after a non-finite step before giving up
# The guard's part for the driver: a failure in it ends the toolkit's steps, never the user's (see observe.guard)
DRIVER = "driver"


class StepDriver:
    """One run's steps, whatever drives them. ``max_findings``: located faults kept (each costs armed steps)."""

    def __init__(self, monitor: StabilityMonitor, max_findings: int = 1):
        self.monitor, self.max_findings = monitor, max_findings
        self.ctx: LoopContext | None = None
        self.roots: dict[str, nn.Module] = {}
        self.step = 0
        self.in_step = False
        self.backward_calls = 0
        self.findings: list[tuple[int, Finding]] = []
        self.first_bad: int | None = None
        self._inputs: dict[str, Any] = {}
        self._early_losses: list[Tensor] = []  # backward calls before the run is attached (the first step)
        self._hidden: list[tuple[Tensor, Tensor | None]] = []
        self._attempts_left = 0
        self._armed: ArmedLocator | None = None
        self._located = False
        self._pending: Finding | None = None
        self._stop = ""
        self.scalers = ScalerSpy()  # a GradScaler the loop uses, found without being told (open() .. close())
        self.params_hint: Callable[[], list[Tensor]] = list  # parameters to check before attach (hooks: discovery)
        self.roots_hint: Callable[[], dict[str, nn.Module]] = dict  # module roots before attach (hooks: discovery)
        self._anomaly: Finding | None = None  # the script's own anomaly mode stopped this step's backward
        self.step_backwards = 0  # backward calls in the step in progress
        self.born = BornCheck()  # the gradients as backward made them (born.py)

    attached = property(lambda self: self.ctx is not None)

    def open(self) -> "StepDriver":
        """Start watching for a GradScaler (its loss is logged in true units, its overflows as routine)."""
        self.scalers.install()
        return self

    def close(self) -> None:
        self.close_locator()
        self.scalers.remove()

    @guarded(DRIVER)
    def attach(self, roots: Mapping[str, nn.Module], optimizer: Any, *, loss_fn: nn.Module | None = None,
               scaler: Any = None, model: nn.Module | None = None) -> None:
        """Start the run: ``roots`` name the module paths; ``model`` (default: one module holding the roots
        and every optimizer parameter) is what the monitor measures."""
        self.roots = dict(roots)
        opts = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer] if optimizer is not None else []
        if model is None:
            model = model_of(self.roots, [p for opt in opts for p in optimizer_params(opt)])
        self.ctx = LoopContext(model=model, optimizer=optimizer, loss_fn=loss_fn, scaler=scaler, roots=self.roots)
        self.monitor.on_train_start(self.ctx)

    # -- events ----------------------------------------------------------------------------------
    @guarded(DRIVER)
    def record_inputs(self, name: str, args: tuple, kwargs: dict) -> None:
        if name not in self._inputs:  # references only: copied when a capsule is written
            self._inputs[name] = {"args": list(args), "kwargs": dict(kwargs)}

    @guarded(DRIVER)
    def start_step(self, step: int | None = None, batch: Any = None, lr: float | None = None,
                   signal_dims: Any = None, arm: bool = True) -> None:
        """The step begins (a no-op inside a step). ``step``/``lr`` default to the driver's count and the
        first optimizer's learning rate; ``batch`` to the recorded root inputs. ``arm``: its forward is still
        to come (False when a backward or a check starts the step: the locator needs the forward)."""
        if self.in_step or self.ctx is None:
            return
        self.in_step = True
        c = self.ctx
        if step is not None:
            self.step = step
        c.begin(self.step, batch if batch is not None else self._inputs,
                lr if lr is not None else _lr(c.optimizer), signal_dims,
                locating=arm and self._attempts_left > 0 or self._armed is not None)
        for loss in self._early_losses:
            c.add_loss(loss)
        self._early_losses = []
        self.monitor.on_step_start(c)
        if arm:
            self.arm_pending()

    @guarded(DRIVER)
    def arm_pending(self) -> None:
        """A forward is about to run: after a fault, arm the locator for it (until its backward has finished
        it may outlive a step boundary, e.g. a script that calls zero_grad between forward and backward)."""
        if self._attempts_left <= 0 or self._armed is not None or self.ctx is None:
            return
        self._attempts_left -= 1
        self._located = False
        self.ctx.locating = True
        self.monitor.pause_sampling()  # the probe's own statistics would pass the locator's modes
        # unwrapped roots: a finding names model.linear, as events do, not DDP's model.module.linear
        self._armed = ArmedLocator({k: unwrap(m) for k, m in self.roots.items()}).__enter__()

    @guarded(DRIVER)
    def add_loss(self, loss: Tensor | None, terms: Mapping[str, Tensor] | None = None) -> None:
        """A micro-batch's loss (by reference: the loop holds it anyway) and its named terms."""
        if not self.in_step:
            self.start_step(arm=False)
        self.ctx.add_loss(loss, dict(terms) if terms else None)

    @guarded(DRIVER)
    def before_backward(self, loss: Tensor | None) -> None:
        if not self.in_step:
            self.start_step(arm=False)
        self.backward_calls += 1
        self.step_backwards += 1
        loss = self.scalers.true_loss(loss)  # `scaler.scale(loss).backward()`: the loss, not the scaled one
        if isinstance(loss, Tensor) and loss.numel() == 1:
            if self.ctx is None:
                self._early_losses.append(loss)
            else:
                self.ctx.add_loss(loss)
        if self._armed is not None:
            self._armed.backward_started()

    @guarded(DRIVER)
    def forward_over(self) -> None:
        """A loop that calls the driver itself (MonitorSession) has finished its forward: its backward comes next."""
        if self._armed is not None:
            self._armed.backward_started()

    @guarded(DRIVER)
    def after_backward(self, loss: Tensor | None, exc: Exception | None = None) -> None:
        """Backward has returned (``exc``: it raised). The gradients are checked here, as backward made them:
        later user code may sanitise (nan_to_num), clip or skip them before the optimizer sees them."""
        if exc is None:
            self.born.after_backward(self._params() if self.ctx is not None else self.params_hint())
        elif self._armed is None:
            try:
                self._anomaly = anomaly_finding(exc, loss, self.roots or self.roots_hint()) or self._anomaly
            except Exception:  # the script's own error must reach it unchanged, not ours
                log.exception("the anomaly-mode error of step %d could not be read into a finding", self.step)
        self._finish_armed(loss, exc)

    @guarded(DRIVER)
    def backward_over(self, loss: Tensor | None) -> None:
        """A loop that calls the driver itself (MonitorSession) has run its backward and checks the step next:
        an armed locator gives its finding (no check at backward: nothing can rewrite the gradients between)."""
        self._finish_armed(loss, None)

    def _finish_armed(self, loss: Tensor | None, exc: Exception | None) -> None:
        armed = self._armed
        if armed is None or self._located:
            return
        self._located = True  # one forward + backward per arming
        finding = armed.error(exc) if exc is not None else armed.finish(loss, self._params())
        if finding is None:
            return
        if exc is None and self.monitor.dist is not None:
            self._pending = finding  # kept once the step's collective decision says this rank originated it
        else:
            self._record_finding(finding)

    def arm_locator(self, attempts: int = 1) -> None:
        """Run the locator in the next ``attempts`` steps without a fault first (a re-run aiming at a recorded
        bad step: ``risdiag locate``)."""
        self._attempts_left = max(self._attempts_left, attempts)

    def close_locator(self) -> None:
        """Leave the armed locator's modes (from an optimizer hook or step end: outside torch functions)."""
        armed, self._armed = self._armed, None
        if armed is not None:
            armed.close()

    @guarded(DRIVER, False)
    def check_step(self, grads_finite: bool | None = None) -> bool:
        """The step's gradients are complete: check them (``grads_finite``: the loop's own verdict, if it
        took one). Returns True when the step must be skipped; ``ctx.stop_requested`` says whether to stop.
        A GradScaler overflow is not a skip request (the scaler skips by itself) but marks the step skipped."""
        if not self.in_step:
            self.start_step(arm=False)
        c = self.ctx
        if self._located:
            self.close_locator()
        if grads_finite is not None:
            c.grads_finite = grads_finite
        if c.scaler is None:
            c.scaler = self.scalers.scaler
        if self._anomaly is not None:  # the script's anomaly mode found a NaN in this step's backward
            c.grads_finite = False
        self.born.into(c)  # read with the step's verdict, not here (monitor/step_reads.py)
        self.monitor.on_after_backward(c)
        self.born.learn(not bool(c.grads_finite))
        if self.monitor.found_late:  # observe: a fault of an earlier step, read only now; locate it from here
            self.first_bad = min(self.monitor.found_late + ([self.first_bad] if self.first_bad is not None else []))
            self.monitor.found_late.clear()
            if len(self.findings) < self.max_findings and not c.locating and self._attempts_left == 0:
                self._attempts_left = LOCATE_ATTEMPTS
        self._settle_finding()
        c.skipped = bool(c.skip_requested) or self.monitor.overflow
        c.skip_reason = c.skip_requested or ("amp_overflow" if self.monitor.overflow else "")
        if not bool(c.grads_finite):
            self._on_nonfinite()
        elif self.monitor.exploded:  # a catastrophic finite gradient (on_explosion): stop, or locate its crash
            self._on_explosion()
        anomaly, self._anomaly = self._anomaly, None
        if anomaly is not None and len(self.findings) < max(self.max_findings, 1):
            self._record_finding(anomaly)
        return bool(c.skip_requested)

    @guarded(DRIVER)
    def before_update(self) -> None:
        """The optimizer is about to apply this (checked, not skipped) step's gradients."""
        if not self.ctx.skipped:
            self.monitor.on_before_optimizer_step(self.ctx)

    @guarded(DRIVER)
    def end_step(self, skipped: bool | None = None, reason: str = "", raise_stop: bool = True) -> None:
        """The step is over (``skipped``/``reason``: what the loop itself did, when it decides). Under the stop
        policy raises NonFiniteError once no armed step is left (``raise_stop=False``: the caller stops)."""
        if not self.in_step:
            return
        if skipped is not None:
            self.ctx.skipped, self.ctx.skip_reason = skipped, reason or self.ctx.skip_reason
        if self._located:  # an armed locator whose forward has begun but not its backward stays
            self.close_locator()
        self.monitor.on_step_end(self.ctx)
        self.ctx.drop_graph()
        self.step += 1
        self.in_step = False
        self._inputs, self.step_backwards = {}, 0
        self.born.reset()
        if raise_stop and self._stop and self._attempts_left == 0:
            raise NonFiniteError(self._stop)

    @guarded(DRIVER)
    def end_unstepped(self, reason: str = "the script skipped optimizer.step()", raise_stop: bool = True) -> None:
        """The step ends without an optimizer step (the script's own gate skipped it; seen at the next
        zero_grad or at the end of the run): checked like any step, recorded as skipped."""
        if not self.in_step:
            self.start_step(arm=False)
        if not self.in_step:
            return
        self.check_step()
        self.end_step(skipped=True, reason=self.ctx.skip_requested or reason, raise_stop=raise_stop)

    # -- the hook form: one optimizer's pre / post step --------------------------------------------
    @guarded(DRIVER, False)
    def before_optimizer_step(self) -> bool:
        """Check the step; True when it must be skipped (its gradients are then hidden from the update)."""
        skip = self.check_step()
        if skip:
            self._hide_grads()
        else:
            self.before_update()
        return skip

    def after_optimizer_step(self) -> None:
        self._restore_grads()  # unguarded: a skipped step's gradients come back even if the driver failed
        self.end_step()

    # -- internals --------------------------------------------------------------------------------
    def _on_nonfinite(self) -> None:
        c = self.ctx
        if self.first_bad is None:
            self.first_bad = c.step
        if c.stop_requested and not self._stop:
            self._stop = c.stop_requested
        if len(self.findings) < self.max_findings and not c.locating and self._attempts_left == 0:
            self._attempts_left = 1 if self._stop else LOCATE_ATTEMPTS

    def _on_explosion(self) -> None:
        """Under stop: stop at the step's end. Under observe the update is applied: the next steps run under
        the locator, so that a crash they cause (an op refusing an inf input) gets its forward origin."""
        c = self.ctx
        if c.stop_requested and not self._stop:
            self._stop = c.stop_requested
        elif (self.monitor.cfg.on_explosion == "observe" and len(self.findings) < self.max_findings
              and not c.locating and self._attempts_left == 0):
            self._attempts_left = LOCATE_ATTEMPTS

    @guarded(DRIVER)
    def crashed(self, exc: BaseException) -> None:
        """The loop raised ``exc`` inside a step run under the locator: the finding of the forward (or
        backward) that raised, e.g. where the value an op refused first went non-finite."""
        armed = self._armed
        if armed is not None and not self._located and isinstance(exc, Exception) and self.in_step:
            self._located = True
            self._record_finding(armed.error(exc))

    @guarded(DRIVER)
    def keep_pending_finding(self) -> None:
        """At the end of the run: a finding whose step never reached optimizer.step() (no collective
        decision came) is kept as this rank's."""
        finding, self._pending = self._pending, None
        if finding is not None:
            self._record_finding(finding)

    def _settle_finding(self) -> None:
        """Under DDP a rank whose local gradients were finite received the NaN through the all-reduce: its
        locator can only name the collective, so the originating rank's finding (in its shard) stands."""
        finding, self._pending = self._pending, None
        if finding is None:
            return
        if self.monitor.originates_fault():
            self._record_finding(finding)
            return
        self._attempts_left = 0
        mon = self.monitor
        decision = mon.last_decision
        origins = decision.origins if decision is not None else []
        mon.event("finding_elsewhere", "info",
                  f"step {self.ctx.step}: the non-finite gradients reached this rank through the gradient all-reduce; "
                  f"the finding is in the shard of originating rank(s) {origins}", step=self.ctx.step,
                  origin_ranks=origins)

    def _params(self) -> list[Tensor]:
        opt = self.ctx.optimizer
        opts = opt if isinstance(opt, (list, tuple)) else [opt] if opt is not None else []
        return [p for o in opts for p in optimizer_params(o)] or list(self.ctx.model.parameters())

    def _hide_grads(self) -> None:
        self._hidden = [(p, p.grad) for p in self._params()]
        for p, _ in self._hidden:
            p.grad = None

    def _restore_grads(self) -> None:
        for p, g in self._hidden:
            p.grad = g
        self._hidden = []

    def _record_finding(self, finding: Finding) -> None:
        step = self.ctx.step
        self.findings.append((step, finding))
        self._attempts_left = 0
        where = " ".join(x for x in (finding.node or finding.op, finding.module and f"in {finding.module}",
                                     finding.location and f"at {finding.location}") if x)
        mon = self.monitor
        first = f"first non-finite step {self.first_bad}" if self.first_bad is not None else "after a gradient explosion"
        origin = mon.trace_back_note(step)  # the earlier update that put the parameters out of range, if one did
        msg = f"finding (step {step}, {first}): phase {finding.phase}, {where}: {finding.cause}{origin}"
        extra = {"update_origin": origin[2:]} if origin else {}
        mon.event("finding", "error", msg, nonfinite=True, step=step, first_nonfinite_step=self.first_bad,
                  source="in-process locator", finding=finding.to_dict(), **extra)
        if len(self.findings) == 1:
            write_finding(mon.run_dir, {**finding.to_dict(), "step": step, "first_nonfinite_step": self.first_bad,
                                        "source": "in-process locator (armed step of the traced script)", **extra})
        log.warning("%s", format_finding(finding))


__all__ = ["LOCATE_ATTEMPTS", "NonFiniteError", "StepDriver"]
