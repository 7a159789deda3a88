"""LoopCallbacks: the front door for a training loop with a callback protocol of its own (named points called
with the loop's step context), such as a research pipeline's ``train(..., callbacks=[...])``.

The loop's context is read at the named points and never kept: ``on_train_start`` (``model``, ``optimizer``,
``loss_fn``, ``scaler``), ``on_step_start`` (``step``, ``batch``, ``lr``, ``signal_dims``), ``on_after_forward``
(``loss``, ``terms``), ``on_after_backward`` (``grads_finite``: the loop's own verdict, or None), ``on_step_end``
(``skipped``, ``skip_reason``). The step driver's decision goes back through the loop's own
``request_skip(reason)`` / ``request_stop(reason)``, so the loop keeps control of its update.
``on_exception`` / ``on_train_end`` only note how the loop ended: the front door that owns the run ends it
with :func:`ris_stability.attach.finish.finish_run`.
"""
from __future__ import annotations

from typing import Any

from ris_stability.attach.driver import DRIVER, StepDriver
from ris_stability.observe.guard import guarded


class LoopCallbacks:
    """Feed ``driver`` from a loop's named points. ``stop_errors``: the loop's own exception classes that mean
    "stopped by the non-finite policy" (they end the run as stopped, not crashed)."""

    def __init__(self, driver: StepDriver, stop_errors: tuple[type[BaseException], ...] = ()):
        self.driver, self.stop_errors = driver, tuple(stop_errors)
        self.error: BaseException | None = None

    def on_train_start(self, ctx: Any) -> None:
        roots = {"model": ctx.model} if ctx.loss_fn is None else {"model": ctx.model, "loss": ctx.loss_fn}
        self.driver.attach(roots, ctx.optimizer, loss_fn=ctx.loss_fn, scaler=ctx.scaler, model=ctx.model)

    def on_step_start(self, ctx: Any) -> None:
        self.driver.end_step(raise_stop=False)  # a step the loop left without on_step_end (an exception)
        self.driver.start_step(ctx.step, ctx.batch, float(ctx.lr), ctx.signal_dims)

    def on_after_forward(self, ctx: Any) -> None:
        self.driver.add_loss(ctx.loss, ctx.terms)

    @guarded(DRIVER)
    def on_after_backward(self, ctx: Any) -> None:
        d = self.driver
        d.check_step(ctx.grads_finite)
        if d.ctx.skip_requested:
            ctx.request_skip(d.ctx.skip_requested)
        if d.ctx.stop_requested:
            ctx.request_stop(d.ctx.stop_requested)

    def on_before_optimizer_step(self, ctx: Any) -> None:
        if not ctx.skip_requested:
            self.driver.before_update()

    def on_step_end(self, ctx: Any) -> None:
        self.driver.end_step(skipped=bool(ctx.skipped), reason=ctx.skip_reason, raise_stop=False)

    def on_exception(self, ctx: Any, exc: BaseException) -> None:
        self.error = exc

    def on_train_end(self, ctx: Any) -> None:
        """Nothing to do: the front door ends the run (finish_run) once the loop has returned."""

    def stopped(self, exc: BaseException | None) -> bool | None:
        """Whether ``exc`` is the loop's own stop of the non-finite policy (None: no loop-specific answer)."""
        return True if exc is not None and isinstance(exc, self.stop_errors) else None


__all__ = ["LoopCallbacks"]
