"""MonitorSession: the explicit front door, for hand-written loops that call the monitor themselves."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ris_stability.attach.driver import StepDriver
from ris_stability.monitor import StabilityMonitor


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
        self.driver = StepDriver(monitor)
        roots = {"model": model} if loss_fn is None else {"model": model, "loss": loss_fn}
        self._attach = dict(roots=roots, optimizer=optimizer, loss_fn=loss_fn, scaler=scaler, model=model)

    @property
    def ctx(self):
        return self.driver.ctx

    def __enter__(self) -> "MonitorSession":
        self.driver.open()
        try:
            self.driver.attach(**self._attach)
        except BaseException:
            self.driver.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.driver.crashed(exc)  # a step run under the locator raised: where its bad value was born
        self.driver.close()
        if exc is not None:
            self.monitor.on_exception(self.ctx, exc)
        else:
            self.monitor.on_train_end(self.ctx)

    @property
    def stop_requested(self) -> str:
        return self.ctx.stop_requested if self.ctx is not None else ""  # None: the driver failed to attach

    def start_step(self, step: int, batch: Any = None, lr: float = math.nan, signal_dims: Any = None) -> None:
        self.driver.end_step(raise_stop=False)  # a loop that never called end_step: close the previous one
        self.driver.start_step(step, batch, lr, signal_dims)

    def after_forward(self, loss: torch.Tensor, terms: dict[str, torch.Tensor] | None = None) -> None:
        self.driver.add_loss(loss, terms)
        self.driver.forward_over()

    def after_backward(self) -> bool:
        """Check the step's gradients; True when the optimizer (or the GradScaler) should step: finite,
        a GradScaler overflow (the scaler skips it itself), or policy 'observe'."""
        self.driver.backward_over(self.ctx.loss if self.ctx is not None else None)
        skip = self.driver.check_step()
        self.driver.before_update()
        return not skip

    def end_step(self) -> None:
        self.driver.end_step(raise_stop=False)
