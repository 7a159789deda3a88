"""The training-loop callback protocol: named points, a mutable StepContext, a no-op base class.

Order of the points within one step (``train`` and ``train_step``):

    on_step_start      batch drawn, model/optimizer still hold the state BEFORE this step
                       (a monitor snapshots them here for a crash capsule)
    on_after_forward   ctx.outputs, ctx.loss, ctx.terms set (the graph is still alive)
    on_after_backward  gradients populated (unscaled under fp16 AMP), ctx.grads_finite set
    on_before_optimizer_step   after clipping (ctx.grad_norm set); ctx.request_skip() still honoured here
    on_step_end        ctx.result (StepResult) set, optimizer stepped or skipped

``on_train_start`` / ``on_train_end`` wrap the run; ``on_exception(ctx, exc)`` is called for any exception
escaping a step, which is then re-raised unchanged. A callback steers the loop only through
``ctx.request_skip(reason)`` (skip this step's optimizer update) and ``ctx.request_stop(reason)`` (end the
run after this step). Callbacks are duck-typed: any object with a subset of these methods works with
``CallbackList``; subclassing ``Callback`` is a convenience.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

POINTS: tuple[str, ...] = (
    "on_train_start", "on_step_start", "on_after_forward", "on_after_backward",
    "on_before_optimizer_step", "on_step_end", "on_exception", "on_train_end",
)


@dataclass
class StepContext:
    """Mutable state shared with callbacks. Fields are set by the loop as the step advances."""

    cfg: Any  # RunConfig
    system: Any  # simulate.System
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any = None  # torch.amp.GradScaler under fp16 AMP, else None
    out_dir: Any = None  # pathlib.Path of the run folder, or None
    step: int = 0  # index of the optimizer step in progress (0-based, global across resumes)
    lr: float = 0.0
    batch: Any = None  # data.Batch of this step
    signal_dims: torch.Tensor | None = None  # (B,) eigenvector count the loss uses per sample (true K)
    outputs: Any = None  # model.ModelOutputs
    loss: torch.Tensor | None = None  # total loss (fp32, attached to the graph until the step ends)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # per-term values, detached
    grads_finite: bool | None = None
    grad_norm: torch.Tensor | None = None  # total norm before clipping (None when not computed)
    skipped: bool = False
    skip_reason: str = ""
    result: Any = None  # train.StepResult, set before on_step_end
    val: dict[str, float] | None = None  # the latest validation metrics
    skip_requested: str = ""  # reason given to request_skip, "" when none
    stop_requested: str = ""  # reason given to request_stop, "" when none
    n_skipped: int = 0  # optimizer steps skipped so far in this run

    def begin_step(self, step: int, batch: Any, lr: float) -> None:
        """Reset the per-step fields (called by the loop before on_step_start)."""
        self.step, self.batch, self.lr = step, batch, lr
        self.signal_dims = batch.k
        self.outputs, self.loss, self.terms = None, None, {}
        self.grads_finite, self.grad_norm, self.result = None, None, None
        self.skipped, self.skip_reason, self.skip_requested = False, "", ""

    def request_skip(self, reason: str = "callback") -> None:
        """Skip this step's optimizer update (gradients are discarded); honoured until before_optimizer_step."""
        self.skip_requested = reason or "callback"

    def request_stop(self, reason: str = "callback") -> None:
        """End the run after the current step (the step itself completes)."""
        self.stop_requested = reason or "callback"


class Callback:
    """No-op base: override the points you need."""

    def on_train_start(self, ctx: StepContext) -> None: ...
    def on_step_start(self, ctx: StepContext) -> None: ...
    def on_after_forward(self, ctx: StepContext) -> None: ...
    def on_after_backward(self, ctx: StepContext) -> None: ...
    def on_before_optimizer_step(self, ctx: StepContext) -> None: ...
    def on_step_end(self, ctx: StepContext) -> None: ...
    def on_exception(self, ctx: StepContext, exc: BaseException) -> None: ...
    def on_train_end(self, ctx: StepContext) -> None: ...


class CallbackList:
    """Dispatches each point to every callback that defines it, in registration order."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = list(callbacks)

    def _call(self, point: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, point, None)
            if fn is not None:
                fn(*args)

    def on_train_start(self, ctx: StepContext) -> None: self._call("on_train_start", ctx)
    def on_step_start(self, ctx: StepContext) -> None: self._call("on_step_start", ctx)
    def on_after_forward(self, ctx: StepContext) -> None: self._call("on_after_forward", ctx)
    def on_after_backward(self, ctx: StepContext) -> None: self._call("on_after_backward", ctx)
    def on_before_optimizer_step(self, ctx: StepContext) -> None: self._call("on_before_optimizer_step", ctx)
    def on_step_end(self, ctx: StepContext) -> None: self._call("on_step_end", ctx)
    def on_exception(self, ctx: StepContext, exc: BaseException) -> None: self._call("on_exception", ctx, exc)
    def on_train_end(self, ctx: StepContext) -> None: self._call("on_train_end", ctx)
