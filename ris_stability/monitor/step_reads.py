"""When the StabilityMonitor reads the device, and what it reads then: one host read per read point.

* The step's verdict (loss, gradients as backward made them, gradients at ``optimizer.step``) is one device
  vector whose parts are finite exactly when those are. Under ``policy`` skip or stop the update depends on
  it, so it is read at the step's check, like a GradScaler's one finite-check flag per step, together with
  everything else queued.
* Under ``observe`` a step that is not sampled reads nothing: its flags and loss wait on the device and are
  read at the next sampled step (or at the end of the run); a fault found then is recorded for its own step
  (event, row, summary) without a capsule, since its state is gone (use ``every=1`` or ``skip`` for those).
* A sampled step's statistics (gradient norms, matrix statistics) join its check's read; what it measures
  after the update (update ratios, its row, liveness) waits for the next read point.

A mixin of StabilityMonitor (see it for the state it uses); the queue is ``monitor/readback.py``.
"""
from __future__ import annotations

import math
import time
import weakref
from typing import Any

import torch
from torch import Tensor

from ris_stability.monitor.context import LoopContext
from ris_stability.monitor.readback import ReadBack
from ris_stability.numerics.norms import peak_magnitudes, screen_total

LATE_NOTE = ("seen at the read of step {seen}: under on_nonfinite='observe' the steps between samples are checked "
             "on the device and read at the next sampled step, so this step has no capsule (every=1 or "
             "on_nonfinite='skip' check each step before its update)")


def finite_value(t: Tensor) -> Tensor:
    """One value (0-d), finite exactly when ``t`` is (its own value when it is one real number: no kernel).
    ``t`` is not detached: stack it under ``torch.no_grad()``, as :meth:`StepReads.verdict_flags` does."""
    if t.numel() == 1 and not t.is_complex():
        return t if t.dim() == 0 else t.reshape(())
    return torch.where(torch.isfinite(t).all(), 0.0, math.nan)


def verdict_of(values: list[float], layout: tuple[int, int, int]) -> tuple[bool, bool, bool]:
    """(loss, gradients at backward, gradients now) finite, from the verdict vector's values."""
    out, at = [], 0
    for n in layout:
        out.append(all(math.isfinite(v) for v in values[at:at + n]))
        at += n
    return out[0], out[1], out[2]


def _loss_slice(ctx: LoopContext) -> Tensor | None:
    """The step's loss as a 1-element device tensor for its row (None: no single-valued loss)."""
    return ctx.loss.detach().reshape(-1)[:1] if ctx.loss is not None and ctx.loss.numel() == 1 else None


class StepReads:
    """The reading half of StabilityMonitor."""

    def init_reads(self) -> None:
        self.reads = ReadBack()
        self.found_late: list[int] = []  # non-finite steps found after their update (observe); the driver's to take
        self._read_step = 0  # the step of the last read point
        self._flags = (True, True, True)  # this step's (loss, gradients at backward, gradients now) verdict
        self._loss_in_verdict: tuple[int, weakref.ref] | None = None  # (step, loss) whose value the verdict holds
        self._loss_read: tuple[int, weakref.ref, float] | None = None  # (step, loss, value) read with the verdict
        self.verdict_layout = (0, 0, 0)  # how many values of the verdict vector each of the three has

    def verdict_flags(self, ctx: LoopContext, grads_in_block: bool) -> Tensor | None:
        """The step's verdict values as one device vector, without a read: the loss, the check at backward's
        screen, the screen of the gradients now (``verdict_layout`` says how many values each has). A part is
        finite when its tensors are (a screen's overflow is confirmed on exact peaks: ``resolve_verdict``).
        ``grads_in_block``: the grad monitor's block holds the gradients' flag (a sampled step)."""
        parts: list[Tensor] = []
        layout = [0, 0, 0]
        self._loss_in_verdict = None
        if ctx.loss is not None:
            parts.append(finite_value(ctx.loss))
            layout[0] = 1
            if ctx.loss.numel() == 1 and not ctx.loss.is_complex():  # the verdict carries the loss's own value
                self._loss_in_verdict = (ctx.step, weakref.ref(ctx.loss))  # a weak one: not its graph
        if ctx.born_screen is not None:
            screen = ctx.born_screen
            parts.append(screen if screen.dim() == 0 else screen.reshape(()))
            layout[1] = 1
        if ctx.grads_finite is None and not grads_in_block and not ctx.born_covers:
            grads = [g for p in ctx.params() if (g := p.grad) is not None]
            if grads:
                parts.append(screen_total(grads))
                layout[2] = 1
        self.verdict_layout = tuple(layout)
        if not parts:
            return None
        device = parts[0].device  # one stack of 0-d values (no reshape kernel per part), recorded by no graph
        with torch.no_grad():
            return torch.stack([t if t.device == device else t.to(device) for t in parts])

    def take_flags(self, values: list[float]) -> None:
        self._flags = verdict_of(values, self.verdict_layout)
        if self._loss_in_verdict is not None:  # the step's row takes its loss from here (no second transfer)
            step, loss = self._loss_in_verdict
            self._loss_read = (step, loss, values[0])

    def _loss_value(self, ctx: LoopContext) -> float | None:
        """The step's loss as read with its verdict (None when it was not: the row queues it)."""
        read = self._loss_read
        return read[2] if read is not None and read[0] == ctx.step and read[1]() is ctx.loss else None

    def resolve_verdict(self, ctx: LoopContext) -> None:
        """After the check's read: ``ctx.grads_finite`` and, for gradients non-finite at backward but not now
        (the script sanitised them), the copies the driver kept of them as born."""
        loss_ok, born_ok, now_ok = self._flags
        if ctx.grads_finite is None:
            if not now_ok:  # the screen's alarm, confirmed on the gradients (a bad step: one more read)
                grads = [p.grad for p in ctx.params() if p.grad is not None]
                now_ok = bool(peak_magnitudes(grads).isfinite().all())
            block = self.grads.grads_finite() if self.grads.block() is not None else None
            ctx.grads_finite = loss_ok and now_ok and (block is None or block)
        if not born_ok and ctx.born_grads is None and ctx.born_grads_fn is not None:
            ctx.born_names, ctx.born_grads = ctx.born_grads_fn()  # confirmed on the gradients as born
            born_ok = not ctx.born_names
        if not born_ok:
            ctx.grads_finite = False

    def defer_verdict(self, ctx: LoopContext, flags: Tensor | None, scale: Tensor | float | None = None) -> None:
        """Observe, a step not sampled: no read now; the verdict (and, under a GradScaler, its ``scale``) is read
        with the next read point, and the step is classified then: a scaler's overflow is recorded as such."""
        step, seen, layout = ctx.step, self, self.verdict_layout
        if flags is None:
            return
        if isinstance(scale, Tensor):
            flags = torch.cat([flags.to(torch.float64), scale.detach().reshape(1).to(flags.device, torch.float64)])

        def late(values: list[float]) -> None:
            verdict = verdict_of(values, layout)
            finite, loss_ok = all(verdict), verdict[0]
            if scale is not None:
                seen._late_amp(step, values[-1] if isinstance(scale, Tensor) else scale, finite, loss_ok)
            if finite or (scale is not None and loss_ok):  # finite, or the scaler's overflow
                return
            seen.nonfinite_steps.append(step)
            seen.found_late.append(step)
            kind = "nonfinite_grad" if loss_ok else "nonfinite_loss"
            msg = (f"non-finite {'gradient' if loss_ok else 'loss'} at step {step} ("
                   + LATE_NOTE.format(seen=seen._read_step) + ")")
            seen.event(kind, "error", msg, step=step, late=True, nonfinite=True)
        self.reads.add(flags, late)

    def _late_amp(self, step: int, scale: float, finite: bool, loss_ok: bool) -> None:
        """A deferred step under a GradScaler: non-finite gradients with a finite loss are the scaler's overflow
        (recorded as on a sampled step: an ``amp_overflow`` event, a skipped step); a collapse of the scale is an
        incident, reported without a capsule (its state is gone)."""
        overflow = not finite and loss_ok
        if overflow:
            self.event("amp_overflow", "info", f"GradScaler overflow at step {step} (scale {scale:.6g}): the scaler "
                       "skipped this step and lowered the scale", step=step, scale=scale, late=True)
            self.skipped_steps.append(step)
            self.event("step_skipped", "warning", f"step {step} skipped (amp_overflow)", step=step,
                       reason="amp_overflow", late=True)
        if self._scale.observe(step, scale, overflow):
            self._status = "nonfinite"
            self.event("amp_scale_collapse", "error", self._scale.describe(scale) + " (" + LATE_NOTE.format(
                seen=self._read_step) + ")", step=step, scale=scale, overflow_steps=self._scale.overflow_steps,
                late=True)

    def read_now(self, step: int) -> None:
        """A read point: everything queued, in one host read."""
        self._read_step = step
        self.reads.read()

    def flush_reads(self) -> None:
        """The end of the run (finish, crash, signal): nothing stays on the device unread."""
        for _ in range(3):  # a function may queue more (e.g. a late row's liveness): read until empty
            if not len(self.reads):
                break
            self.read_now(self._read_step)

    def queue_row(self, ctx: LoopContext, skipped: bool) -> None:
        """The step's row: its host part now, its device part read at the next read point, then written."""
        step = ctx.step
        head: dict[str, Any] = {"step": step, "time_s": time.perf_counter() - self._t0, "lr": float(ctx.lr),
                                "skipped": skipped}
        if self._amp_scale is not None:
            head.update(amp_scale=self._amp_scale, amp_overflow=self.overflow)
        if ctx.micro_batches > 1:
            head["micro_batches"] = ctx.micro_batches
        if self._decision is not None:  # this rank's view before the all-reduce (report: per-rank columns)
            head.update({"local/grad_norm": self._decision.local_grad_norm,
                         "local/nonfinite": 0.0 if self._decision.local_ok else 1.0,
                         "local/origin_rank_count": len(self._decision.origins)})
        known = self._loss_value(ctx)  # read with the verdict: not transferred a second time
        loss = _loss_slice(ctx) if known is None else None
        if not self.cfg.sampled(step):
            def unsampled(values: list[float]) -> None:
                value = known if known is not None else values[0] if values else math.nan
                if step in self.nonfinite_steps:
                    self._write_row(head, value, {}, {}, [], [])
                self._losses.append(value)  # after its row: a step cut short by a signal is counted nowhere
            self.reads.add(loss, unsampled)
            return
        floats, keys, pending = self.grads.take_pending()
        terms = {f"loss/{k}": v for k, v in ctx.terms.items() if v.numel() == 1 and f"loss/{k}" not in keys}
        dead, ripe = self.grads.dead_check()
        sites, self._sites = self._sites, {}
        parts = [loss, pending,
                 torch.stack([v.reshape(()) for v in terms.values()]) if terms else None, dead]
        sizes = [0 if p is None else p.numel() for p in parts]
        present = [p.reshape(-1).to(torch.float64) for p in parts if p is not None]
        device = present[0].device if present else None

        def sampled(values: list[float]) -> None:
            at = [sum(sizes[:i]) for i in range(5)]
            value = known if known is not None else math.nan if loss is None else values[0]
            row = self.grads.collect_from(floats, keys, values[at[1]:at[2]])
            row.update(zip(terms, values[at[2]:at[3]]))
            self._write_row(head, value, row, sites, values[at[3]:at[4]], ripe)
            self._losses.append(value)
        self.reads.add(torch.cat([p.to(device) for p in present]) if present else None, sampled)
