"""The fixed cost of the StabilityMonitor on steps whose statistics are not sampled, measured as step time on
paired steps (used by ``monitor_overhead.py``).

Three copies of an outside-style workload (benchmarks/outside_models.py) take their steps in turn, the order
rotating each step, so that each step of one copy runs next to a step of the others on the same machine state:
``plain``; ``monitored``, under a MonitorSession at every=10; ``checked``, plain plus the check a GradScaler makes
at every step of an AMP loop (one fused finite check of the gradients and one read: the floor of any per-step
skip decision). The fixed cost is the mean of (monitored - plain) over the steps 2-9 of each 10 (step 1 writes
step 0's row, sampled work), the floor the mean of (checked - plain), each with its standard error. Unlike the
monitor's own time, this counts what it costs the training's own ops, and not the cache misses it takes over from
them.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from outside_models import WORKLOADS, session_step, sync
from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor


def scaler_check(params: list[torch.Tensor]) -> None:
    """The check a GradScaler makes at every step of an AMP loop: one fused finite check of the gradients (an
    unscale by 1.0: values unchanged) and one read."""
    grads = [g for p in params if (g := p.grad) is not None]
    found = torch.zeros(1, device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=found.device))
    found.item()


def paired_fixed_cost(name: str, steps: int, warmup: int, tmp: Path, device: str,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, tuple[float, float]]:
    """{"monitored": (mean, standard error), "checked": (...)}: seconds of step time added on the steps not
    sampled (2-9 of each 10) by the monitor at every=10 and by a GradScaler's check, against the plain copy;
    "every10": (ratio, standard error) of the monitored copy's mean step time over every timed step (its sampled
    steps included; ``steps`` a multiple of 10 samples exactly one in ten) to the plain copy's."""
    copies = {kind: WORKLOADS[name](device) for kind in ("plain", "monitored", "checked")}
    monitored = copies["monitored"]
    session = MonitorSession(StabilityMonitor(tmp / f"paired-{time.monotonic_ns()}", MonitorConfig(every=10)),
                             monitored.model, monitored.optimizer)
    params = list(copies["checked"].model.parameters())
    kinds = list(copies)
    added: dict[str, list[float]] = {"monitored": [], "checked": []}
    every_step: list[tuple[float, float]] = []  # (monitored, plain) of every timed step
    with session as s:
        for step in range(warmup + steps):
            took = {}
            for kind in kinds[step % 3:] + kinds[:step % 3]:
                work = copies[kind]
                sync(device)
                t0 = clock()
                if kind == "monitored":
                    session_step(s, work, step)
                else:
                    work.optimizer.zero_grad(set_to_none=True)
                    work.loss(step).backward()
                    if kind == "checked":
                        scaler_check(params)
                    work.optimizer.step()
                sync(device)
                took[kind] = clock() - t0
            if step >= warmup:
                every_step.append((took["monitored"], took["plain"]))
            if step >= warmup and step % 10 > 1:
                for kind in added:
                    added[kind].append(took[kind] - took["plain"])
    result = {kind: (statistics.mean(v), statistics.stdev(v) / math.sqrt(len(v))) for kind, v in added.items()}
    plain = statistics.mean(p for _, p in every_step)
    diffs = [m - p for m, p in every_step]
    result["every10"] = (1 + statistics.mean(diffs) / plain, statistics.stdev(diffs) / math.sqrt(len(diffs)) / plain)
    return result
