"""StepDriver: training events of a loop we do not own -> StabilityMonitor callbacks, the non-finite
policy, and the locator armed for the steps after a fault.

Events (from global hooks, a Lightning callback, or ``watch``): a root module's forward starts
(:meth:`start_step`), backward starts / ends (:meth:`before_backward` / :meth:`after_backward`), the
optimizer is about to step (:meth:`before_optimizer_step`, which says whether to skip) and has stepped
(:meth:`after_optimizer_step`, the end of the step).

Skipping a step we do not drive: the gradients of the optimizer's parameters are hidden (``.grad =
None``) for the duration of ``optimizer.step()`` and put back afterwards. torch.optim optimizers update
neither a parameter nor its state (momentum, Adam's step counter and moments) when its gradient is None.

The finding without a replayer: after a non-finite step the locator is armed for the next step(s) of the
same script (under skip those still hold the pre-fault parameters); the first armed step whose forward
or backward goes non-finite again yields the finding. A fault that never recurs leaves none.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ris_stability.locate.armed import ArmedLocator
from ris_stability.locate.finding import Finding, format_finding
from ris_stability.monitor import LoopContext, StabilityMonitor
from ris_stability.observe.loopstack import unwrap
from ris_stability.records import write_finding

log = logging.getLogger(__name__)

POLICIES = ("skip", "stop", "observe")
LOCATE_ATTEMPTS = 3  # armed steps tried after a non-finite step before giving up


class NonFiniteError(RuntimeError):
    """The run was ended by the ``stop`` policy after a non-finite step (raised from optimizer.step)."""


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def model_of(roots: Mapping[str, nn.Module], params: list[Tensor]) -> nn.Module:
    """One module holding every root and every optimizer parameter no root owns (by reference: the
    user's modules and parameters are registered in a new container, never changed)."""
    owned = {id(p) for m in roots.values() for p in m.parameters()}
    loose = [p for p in params if id(p) not in owned]
    if len(roots) == 1 and not loose:
        return next(iter(roots.values()))
    holder = nn.ModuleDict(dict(roots))
    if loose:
        holder["params"] = nn.ParameterList(loose)
    return holder


def _detached(value: Any, depth: int = 0) -> Any:
    """Capsule-safe copy of forward inputs: tensors detached and cloned, containers kept, anything
    else by its repr (capsules load with weights_only=True)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if depth > 6:
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): _detached(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_detached(v, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def batch_state(batch: Any) -> dict[str, Any]:
    """What a capsule of a script run holds as its batch: each root's first forward inputs of the step."""
    return {"inputs": _detached(batch or {})}


class StepDriver:
    def __init__(self, monitor: StabilityMonitor, policy: str = "skip", max_findings: int = 1):
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite={policy!r}: valid choices {', '.join(POLICIES)}")
        self.monitor, self.policy, self.max_findings = monitor, policy, max_findings
        self.ctx: LoopContext | None = None
        self.roots: dict[str, nn.Module] = {}
        self.step = 0
        self.in_step = False
        self.backward_calls = 0
        self.findings: list[tuple[int, Finding]] = []
        self.first_bad: int | None = None
        self._losses: list[Tensor] = []
        self._inputs: dict[str, Any] = {}
        self._hidden: list[tuple[Tensor, Tensor | None]] = []
        self._attempts_left = 0
        self._armed: ArmedLocator | None = None
        self._located = False
        self._pending: Finding | None = None
        self._stop = ""

    @property
    def attached(self) -> bool:
        return self.ctx is not None

    def attach(self, roots: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.roots = dict(roots)
        model = model_of(self.roots, optimizer_params(optimizer))
        self.ctx = LoopContext(model=model, optimizer=optimizer)
        self.ctx.roots = self.roots
        self.monitor.on_train_start(self.ctx)

    # -- events ----------------------------------------------------------------------------------
    def record_inputs(self, name: str, args: tuple, kwargs: dict) -> None:
        if name not in self._inputs:  # references only: copied when a capsule is written
            self._inputs[name] = {"args": list(args), "kwargs": dict(kwargs)}

    def start_step(self) -> None:
        if self.in_step or self.ctx is None:
            return
        self.in_step = True
        c = self.ctx
        c.step, c.batch, c.lr = self.step, self._inputs, _lr(c.optimizer)
        c.loss, c.terms, c.grads_finite, c.skipped, c.skip_reason, c.skip_requested = None, {}, None, False, "", ""
        c.locating = self._attempts_left > 0
        self.monitor.on_step_start(c)
        if c.locating:
            self._attempts_left -= 1
            self._located = False
            # unwrapped roots: a finding names model.linear, as events do, not DDP's model.module.linear
            self._armed = ArmedLocator({k: unwrap(m) for k, m in self.roots.items()}).__enter__()

    def before_backward(self, loss: Tensor | None) -> None:
        if not self.in_step:
            self.start_step()
        self.backward_calls += 1
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._losses.append(loss)  # by reference (the loop holds it anyway); read detached by the monitor
        if self._armed is not None:
            self._armed.backward_started()

    def after_backward(self, loss: Tensor | None, exc: Exception | None = None) -> None:
        armed = self._armed
        if armed is None or self._located:
            return
        self._located = True  # one forward + backward per arming
        finding = armed.error(exc) if exc is not None else armed.finish(loss, optimizer_params(self.ctx.optimizer))
        if finding is None:
            return
        if exc is None and self.monitor.dist is not None:
            self._pending = finding  # kept once the step's collective decision says this rank originated it
        else:
            self._record_finding(finding)

    def close_locator(self) -> None:
        """Leave the armed locator's modes (from an optimizer hook or step end: outside torch functions)."""
        armed, self._armed = self._armed, None
        if armed is not None:
            armed.close()

    def before_optimizer_step(self) -> bool:
        """Check the step; True when it must be skipped (its gradients are then hidden)."""
        if not self.in_step:
            self.start_step()
        c = self.ctx
        self.close_locator()
        losses = self._losses
        c.loss = None if not losses else losses[0] if len(losses) == 1 else torch.stack(
            [x.detach().reshape(()) for x in losses]).sum()
        self.monitor.on_after_forward(c)
        self.monitor.on_after_backward(c)
        self._settle_finding()
        c.skipped = bool(c.skip_requested)
        c.skip_reason = c.skip_requested
        if not bool(c.grads_finite):
            self._on_nonfinite()
        if c.skipped:
            self._hide_grads()
        else:
            self.monitor.on_before_optimizer_step(c)
        return c.skipped

    def after_optimizer_step(self) -> None:
        self._restore_grads()
        self.monitor.on_step_end(self.ctx)
        self.step += 1
        self.in_step = False
        self._losses, self._inputs = [], {}
        if self._stop and self._attempts_left == 0:
            raise NonFiniteError(self._stop)

    # -- internals --------------------------------------------------------------------------------
    def _on_nonfinite(self) -> None:
        c = self.ctx
        if self.first_bad is None:
            self.first_bad = c.step
        if c.stop_requested and not self._stop:
            self._stop = c.stop_requested
        if len(self.findings) < self.max_findings and not c.locating and self._attempts_left == 0:
            self._attempts_left = 1 if self._stop else LOCATE_ATTEMPTS

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
        if mon.writer is not None:
            decision = mon.last_decision
            origins = decision.origins if decision is not None else []
            mon.writer.event("finding_elsewhere", "info",
                             f"step {self.ctx.step}: the non-finite gradients reached this rank through the gradient "
                             f"all-reduce; the finding is in the shard of originating rank(s) {origins}",
                             step=self.ctx.step, origin_ranks=origins)

    def _hide_grads(self) -> None:
        self._hidden = [(p, p.grad) for p in optimizer_params(self.ctx.optimizer)]
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
        msg = f"finding (step {step}, first non-finite step {self.first_bad}): phase {finding.phase}, {where}: {finding.cause}"
        mon = self.monitor
        if mon.writer is not None:
            mon.writer.event("finding", "error", msg, step=step, first_nonfinite_step=self.first_bad,
                             source="in-process locator", finding=finding.to_dict())
            if len(self.findings) == 1:
                write_finding(mon.run_dir, {**finding.to_dict(), "step": step, "first_nonfinite_step": self.first_bad,
                                            "source": "in-process locator (armed step of the traced script)"})
        log.warning("%s", format_finding(finding))
        if mon.live is not None:
            mon.live.update(step, event=msg, nonfinite=True)


def _lr(optimizer: torch.optim.Optimizer | None) -> float:
    if optimizer is None or not optimizer.param_groups:
        return math.nan
    lr = optimizer.param_groups[0].get("lr", math.nan)
    return float(lr) if isinstance(lr, (int, float)) else math.nan


__all__ = ["LOCATE_ATTEMPTS", "NonFiniteError", "POLICIES", "StepDriver", "batch_state", "model_of",
           "optimizer_params"]
