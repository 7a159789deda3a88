"""MonitorSession: drive a StabilityMonitor from a hand-written loop, and LoopContext, the small context
object the monitor reads in loops that do not pass one of their own."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from ris_stability.monitor import StabilityMonitor


@dataclass
class LoopContext:
    """The context the monitor reads, for loops that do not pass a step context of their own."""

    model: torch.nn.Module
    optimizer: Any = None  # one optimizer or a sequence of them (all step together)
    loss_fn: torch.nn.Module | None = None
    scaler: Any = None  # a GradScaler under fp16 AMP: its overflow steps are routine, not faults
    micro_batches: int = 0  # after_forward calls this step (gradient accumulation)
    step: int = 0
    lr: float = math.nan
    batch: Any = None
    signal_dims: Any = None
    loss: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    grads_finite: bool | None = None
    skipped: bool = False
    skip_reason: str = ""
    skip_requested: str = ""
    stop_requested: str = ""
    roots: dict[str, torch.nn.Module] | None = None  # names of the module paths (default {"model": model})
    locating: bool = False  # the step runs under the locator (armed after a fault): no matrix sampling

    def request_skip(self, reason: str = "monitor") -> None:
        self.skip_requested = reason

    def request_stop(self, reason: str = "monitor") -> None:
        self.stop_requested = reason


class MonitorSession:
    """Drive a StabilityMonitor from any hand-written loop::

        with MonitorSession(StabilityMonitor("runs/x"), model, optimizer, loss_fn) as s:
            for step, batch in enumerate(loader):
                s.start_step(step, batch)
                loss = loss_fn(model(batch), batch)
                s.after_forward(loss, terms={"mse": loss})
                loss.backward()
                if s.after_backward():      # False: non-finite and the policy says skip
                    optimizer.step()
                s.end_step()
                if s.stop_requested:
                    break

    Gradient accumulation: call ``after_forward`` for every micro-batch (the step's loss and terms are
    their sums) and ``after_backward`` once, after the last micro-batch's backward. Several optimizers:
    pass them as a list. fp16 AMP: pass the GradScaler (``scaler=``) and call ``scaler.step`` /
    ``scaler.update`` whenever ``after_backward`` returns True (it does on an overflow: the scaler skips
    that step itself).
    """

    def __init__(self, monitor: StabilityMonitor, model: torch.nn.Module, optimizer: Any = None,
                 loss_fn: torch.nn.Module | None = None, scaler: Any = None,
                 audit_fn: Callable[[], torch.Tensor] | None = None):
        """``audit_fn()``: recomputes the current step's loss (e.g. ``lambda: loss_fn(model(x), y)``); given,
        the monitor audits the gradient's precision on spikes and every ``cfg.audit_every`` steps."""
        self.monitor = monitor
        monitor.audit_fn = audit_fn
        self.ctx = LoopContext(model=model, optimizer=optimizer, loss_fn=loss_fn, scaler=scaler)

    def __enter__(self) -> "MonitorSession":
        self.monitor.on_train_start(self.ctx)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.monitor.on_exception(self.ctx, exc)
        else:
            self.monitor.on_train_end(self.ctx)

    @property
    def stop_requested(self) -> str:
        return self.ctx.stop_requested

    def start_step(self, step: int, batch: Any = None, lr: float = math.nan, signal_dims: Any = None) -> None:
        c = self.ctx
        c.step, c.batch, c.lr, c.signal_dims = step, batch, lr, signal_dims
        c.loss, c.terms, c.grads_finite, c.skipped, c.skip_reason, c.skip_requested = None, {}, None, False, "", ""
        c.micro_batches = 0
        self.monitor.on_step_start(c)

    def after_forward(self, loss: torch.Tensor, terms: dict[str, torch.Tensor] | None = None) -> None:
        c = self.ctx
        terms = {k: v.detach() for k, v in (terms or {}).items()}
        if c.micro_batches == 0:
            c.loss, c.terms = loss, terms
        else:  # gradient accumulation: the step's gradient is that of the sum of the micro-batch losses
            c.loss = c.loss.detach() + loss.detach()
            c.terms = {k: c.terms[k] + v if k in c.terms else v for k, v in terms.items()}
        c.micro_batches += 1
        self.monitor.on_after_forward(c)

    def after_backward(self) -> bool:
        """Check the step's gradients; True when the optimizer (or the GradScaler) should step: finite,
        a GradScaler overflow (the scaler skips it itself), or policy 'observe'."""
        self.monitor.on_after_backward(self.ctx)
        overflow = self.monitor.overflow
        self.ctx.skipped = bool(self.ctx.skip_requested) or overflow
        self.ctx.skip_reason = self.ctx.skip_requested or ("amp_overflow" if overflow else "")
        if not self.ctx.skipped:
            self.monitor.on_before_optimizer_step(self.ctx)
        return not self.ctx.skip_requested

    def end_step(self) -> None:
        self.monitor.on_step_end(self.ctx)
