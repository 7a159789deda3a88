"""The monitor's explosion checks: a logged step's finite gradients judged from step 0 (the rules are in
``instruments/explosion.py`` and docs/explosions.md), the ``on_explosion`` policy applied before the update,
and a later crash or non-finite loss traced back to the update that put the parameters out of range.

A mixin of StabilityMonitor, kept apart so that the monitor's file holds the order of the step's checks and
this one what an explosion does. It reads only the grad monitor's one read-back of a logged step (gradient
norms, parameter norms and per-group norms travel together); an unlogged step costs nothing, and the
trace-back reads the parameters once, when the run has already gone wrong.
"""
from __future__ import annotations

import math
import torch

from ris_stability.instruments.explosion import TOTAL, ExplosionDetector, UpdateOrigin
from ris_stability.instruments.grad_block import TOTAL_KEY, group_key
from ris_stability.instruments.spikes import TOTAL as SPIKE_TOTAL
from ris_stability.monitor.context import LoopContext
from ris_stability.observe.loopstack import optimizers_of

POLICY_NOTE = {
    "observe": "the optimizer applies it (on_explosion='observe'; 'skip' keeps the parameters)",
    "skip": "step skipped (on_explosion='skip'): parameters and optimizer state unchanged",
    "stop": "run stopped before the update (on_explosion='stop')",
}


class ExplosionChecks:
    """The explosion half of StabilityMonitor (see StabilityMonitor for the state it uses)."""

    def init_explosions(self) -> None:
        """The per-run state (called by StabilityMonitor.__init__; the dtype is set at attach)."""
        self.explosions = ExplosionDetector()
        self.explosion_steps: list[int] = []  # logged steps judged exploding (warnings included)
        self.exploded = False  # this step's gradient is catastrophic (reset at every step start)
        self._origin: UpdateOrigin | None = None
        self._origin_checked = self._origin_written = False

    def _check_explosion(self, ctx: LoopContext) -> bool:
        """Judge this logged step with finite gradients; True when catastrophic (the policy has then been
        applied; the spike rule still judges the step, for its precision audit, but writes no second capsule)."""
        norms = self.grads.peek_norms()
        params = self.grads.peek_block("param/")
        sites = {name: site["grad_norm"] for name, site in self._sites.items()
                 if isinstance(site.get("grad_norm"), float)}
        modules = {k: v for k, v in norms.items() if k != TOTAL_KEY}
        verdict = self.explosions.observe(
            ctx.step, norms.get(TOTAL_KEY, math.nan), modules, sites,
            {(TOTAL if k == TOTAL_KEY else k): v for k, v in params.items()},
            _sgd_update_ratio(ctx, self.grads.peek_block("grad_group/"), params.get(TOTAL_KEY, math.nan)),
            has_baseline=self.spikes.threshold(SPIKE_TOTAL) is not None)
        if verdict is None:
            return False
        self.explosion_steps.append(ctx.step)
        msg = verdict.message()
        if not verdict.catastrophic:
            self.event("gradient_explosion", "warning", msg, step=ctx.step, **verdict.data())
            return False
        self.exploded = True
        policy = self.cfg.on_explosion
        if self.originates_fault():  # the run's capsule budget keeps the first and the latest (capsule_store.py)
            path = self._write_capsule(ctx, reason=msg)  # its path: the write itself is in the background
            if path is not None:
                command = f"risdiag bisect --precision {path}" + ("" if self.replayer else " --replayer module:function")
                msg += f"; capsule written: check the gradient with `{command}`" + (
                    "" if self.replayer else " (a replayer you write: docs/script.md)")
        msg += "; " + POLICY_NOTE[policy]
        self.event("gradient_explosion", "error", msg, step=ctx.step, policy=policy, **verdict.data())
        if policy in ("skip", "stop"):
            ctx.request_skip("explosion")
        if policy == "stop":
            ctx.request_stop(msg)
        return True

    def update_origin(self) -> UpdateOrigin | None:
        """The update that put the parameters out of range, looked for once (at the first crash or non-finite
        step: one read of the parameter norms) and kept."""
        if not self._origin_checked and self.grads is not None:
            self._origin_checked = True
            self._origin = self.explosions.trace_back(self.grads.param_norms(), frozenset(self.skipped_steps))
        return self._origin

    def trace_back_note(self, step: int | None) -> str:
        """``"; parameters of X grew ... at the update of step N ..."`` for a crash or non-finite value at
        ``step`` (empty when no update grew them out of range); the first call writes an explosion_origin event."""
        origin = self.update_origin()
        if origin is None:
            return ""
        if not self._origin_written and self.writer is not None:
            self._origin_written = True
            self.event("explosion_origin", "error", f"step {step} went non-finite after an explosion: "
                       f"{origin.message()}", step=origin.step, failed_step=step, **origin.data())
        return "; " + origin.message()


def _sgd_update_ratio(ctx: LoopContext, group_norms: dict[str, float], weight: float) -> float | None:
    """||lr g|| / ||w|| of the coming update when every optimizer is torch.optim.SGD (its first step is
    lr * g, momentum only adds the past); None for an adaptive optimizer, whose update is not lr * g."""
    opts = optimizers_of(ctx)
    if not opts or not all(isinstance(o, torch.optim.SGD) for o in opts) or not weight > 0:
        return None
    total = 0.0
    for k, opt in enumerate(opts):
        for g, group in enumerate(opt.param_groups):
            norm = group_norms.get(group_key(k, g, group, len(opts)))
            lr = group.get("lr")
            if norm is None or not isinstance(lr, (int, float, torch.Tensor)):
                return None
            update = float(lr) * norm
            total += update * update  # not ** 2: a float power raises OverflowError beyond 1e154
    return math.sqrt(total) / weight


__all__ = ["ExplosionChecks", "POLICY_NOTE"]
