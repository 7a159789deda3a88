"""Learning-rate schedule: linear warmup then cosine decay, a pure function of the step.

lr(step) = lr * (step + 1) / warmup_steps                       for step < warmup_steps
         = lr * (m + (1 - m) * (1 + cos(pi * t)) / 2)            otherwise,
with m = min_lr_frac and t = (step - warmup_steps) / max(1, steps - warmup_steps - 1) clamped to [0, 1],
so the first post-warmup step runs at the peak lr and the last step (steps - 1) at m * lr.
"""

from __future__ import annotations

import math

from ris_model.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based). Pure: depends on nothing else."""
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    m = cfg.min_lr_frac
    return cfg.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * t)))
