"""Mixed precision: read a GradScaler from outside and tell its routine overflows from a collapse.

Under fp16 autocast a GradScaler multiplies the loss by a large scale; when the scaled gradients overflow
it skips the optimizer step and halves the scale. Such an overflow is the scaler doing its job, not a
fault: the monitor records it as ``amp_overflow`` (with the scale), writes no capsule and does not mark
the run non-finite. A scale that keeps falling (below ``collapse_below`` for ``collapse_steps``
consecutive steps) means the gradients are non-finite at any scale: that is an incident.

The scaler is read duck-typed (``get_scale()``/``_scale``, ``is_enabled()``, the per-optimizer
``found_inf_per_device`` of ``unscale_``), so torch.amp.GradScaler, torch.cuda.amp.GradScaler and
look-alikes (e.g. a ShardedGradScaler) all work; the scaler is never modified. bf16 autocast needs no
scaler and is observed like float32 training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

COLLAPSE_BELOW = 1.0  # a scale under 1 no longer amplifies small gradients: fp16 underflow is back
COLLAPSE_STEPS = 10  # consecutive steps under COLLAPSE_BELOW that make an incident


def is_scaler(obj: Any) -> bool:
    """True for an enabled GradScaler-like object."""
    return (obj is not None and callable(getattr(obj, "get_scale", None)) and callable(getattr(obj, "scale", None))
            and bool(getattr(obj, "is_enabled", lambda: True)()))


def scale_tensor(scaler: Any) -> torch.Tensor | float:
    """The current loss scale without a host read: the scaler's own device tensor (read by the caller with its
    other values), or a float for a scaler that keeps none."""
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.detach().reshape(-1)[0]
    return float(scaler.get_scale())


def _state(scaler: Any, optimizer: Any) -> dict | None:
    states = getattr(scaler, "_per_optimizer_states", None)
    return states.get(id(optimizer)) if isinstance(states, dict) else None


def unscaled(scaler: Any, optimizers: Sequence[Any]) -> bool:
    """True when ``unscale_`` already ran for every optimizer this step (gradients in true units)."""
    states = [_state(scaler, opt) for opt in optimizers]
    return bool(states) and all(s is not None and getattr(s.get("stage"), "name", "") == "UNSCALED" for s in states)


def found_inf(scaler: Any, optimizers: Sequence[Any]) -> bool | None:
    """What ``unscale_`` found (True: the scaler will skip this step); None before ``unscale_``."""
    seen = None
    for opt in optimizers:
        state = _state(scaler, opt)
        per_device = (state or {}).get("found_inf_per_device") or {}
        if per_device:
            seen = bool(seen) or any(float(v) > 0 for v in per_device.values())
    return seen


@dataclass
class ScaleWatch:
    """Overflow steps and the collapse rule over the scale seen after each backward."""

    collapse_below: float = COLLAPSE_BELOW
    collapse_steps: int = COLLAPSE_STEPS
    overflow_steps: list[int] = field(default_factory=list)
    low_run: int = 0
    collapsed_at: int | None = None

    def observe(self, step: int, scale: float, overflow: bool) -> bool:
        """Record one step; True exactly once, at the step where the collapse rule first holds."""
        if overflow:
            self.overflow_steps.append(step)
        self.low_run = self.low_run + 1 if (scale < self.collapse_below or not math.isfinite(scale)) else 0
        if self.collapsed_at is None and self.low_run >= self.collapse_steps:
            self.collapsed_at = step
            return True
        return False

    def describe(self, scale: float) -> str:
        return (f"GradScaler scale collapsed to {scale:.3g} (below {self.collapse_below:g} for {self.low_run} "
                f"consecutive steps; {len(self.overflow_steps)} overflow steps so far): the gradients are "
                "non-finite at any scale, so this is a real fault, not fp16 overflow")
