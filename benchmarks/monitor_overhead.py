"""Step time of ris_model training with the StabilityMonitor off, on every step, and on every 10 steps.

Ratios come from one process, runs interleaved (off, every-1, every-10, off, ...) so that machine load
affects all three alike; the per-step time is the median interval between consecutive step starts, so
it includes everything the monitor adds (probes, gradient norms, trace rows), but not data generation
differences (identical in all runs). Usage: python benchmarks/monitor_overhead.py [--steps 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ris_model.config import load_config
from ris_model.train import train
from ris_stability.monitor import MonitorConfig, StabilityMonitor

ROOT = Path(__file__).resolve().parents[1]


class StepClock:
    """Timestamps every step start; intervals between them are whole step times."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_step_start(self, ctx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, ctx) -> None:
        self.starts.append(time.perf_counter())

    def median_step(self, skip: int = 2) -> float:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])][skip:]
        return statistics.median(gaps)


def one_run(config: str, steps: int, every: int | None, tmp: Path, overrides: list[str]) -> float:
    cfg = load_config(ROOT / "configs" / config,
                      [f"train.steps={steps}", "train.val_every=0", "train.checkpoint_every=0", *overrides])
    clock = StepClock()
    callbacks: list = [clock]
    if every is not None:
        callbacks.append(StabilityMonitor(tmp / f"run-{time.monotonic_ns()}", MonitorConfig(every=every)))
    train(cfg, callbacks=callbacks)
    return clock.median_step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", nargs="*", default=["quickstart.toml", "default.toml"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. train.device=cuda")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {args.steps} steps x {args.rounds} rounds, overrides {args.overrides or 'none'}")
    print(f"{'config':<18}{'off ms':>10}{'every=1 ms':>12}{'every=10 ms':>13}{'ratio 1':>10}{'ratio 10':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            times: dict[str, list[float]] = {"off": [], "1": [], "10": []}
            for _ in range(args.rounds):
                times["off"].append(one_run(config, args.steps, None, Path(tmp), args.overrides))
                times["1"].append(one_run(config, args.steps, 1, Path(tmp), args.overrides))
                times["10"].append(one_run(config, args.steps, 10, Path(tmp), args.overrides))
            off, e1, e10 = (statistics.median(times[k]) for k in ("off", "1", "10"))
            print(f"{config:<18}{off * 1e3:>10.1f}{e1 * 1e3:>12.1f}{e10 * 1e3:>13.1f}{e1 / off:>10.3f}{e10 / off:>10.3f}")


if __name__ == "__main__":
    main()
