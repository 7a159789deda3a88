"""Training throughput (quickstart and default) and the quickstart training curve, measured in one run.

    python benchmarks/train_bench.py [--default-steps 40] [--quick-steps N]

Prints, per config: parameters, mean train_step time (forward + loss + backward + optimizer), mean data time
(simulating the batch), samples/s over both, and the default/quickstart step-time ratio; then the
quickstart curve: train loss (mean over windows) and validation loss at every validation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from ris_model.callbacks import Callback  # noqa: E402
from ris_model.config import load_config, replace  # noqa: E402
from ris_model.data import SimDataset  # noqa: E402
from ris_model.model import count_parameters  # noqa: E402
from ris_model.train import train, validate  # noqa: E402


class Clock(Callback):
    """Wall time of each whole iteration (data + step + bookkeeping), from one step start to the next;
    also validates the untrained model once, so the curve starts at step 0."""

    def __init__(self, initial_val: bool) -> None:
        self.starts: list[float] = []
        self.initial_val = initial_val
        self.val0: dict[str, float] | None = None

    def on_train_start(self, ctx) -> None:
        if self.initial_val and ctx.cfg.data.n_val:
            self.val0 = validate(ctx.model, ctx.loss_fn, SimDataset(ctx.cfg, "val", system=ctx.system).batches())

    def on_step_start(self, ctx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, ctx) -> None:
        self.starts.append(time.perf_counter())


def measure(path: str, steps: int | None, val: bool) -> dict:
    cfg = load_config(ROOT / path)
    if not val:
        cfg = replace(cfg, train=replace(cfg.train, val_every=0))
    clock = Clock(initial_val=val)
    t0 = time.perf_counter()
    res = train(cfg, callbacks=[clock], steps=steps)
    wall = time.perf_counter() - t0
    iters = [b - a for a, b in zip(clock.starts, clock.starts[1:])]
    return {"cfg": cfg, "res": res, "wall": wall, "params": count_parameters(res.model), "val0": clock.val0,
            "step_s": res.step_time_s, "iter_s": statistics.median(iters), "n": len(res.history)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--default-steps", type=int, default=40)
    ap.add_argument("--quick-steps", type=int, default=None, help="default: the config's train.steps")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads before the run")
    quick = measure("configs/quickstart.toml", args.quick_steps, val=True)
    default = measure("configs/default.toml", args.default_steps, val=False)
    print(f"\n{'config':<12} {'params':>9} {'steps':>6} {'step ms':>8} {'iter ms':>8} {'samples/s':>10} {'wall s':>7}")
    for name, m in (("quickstart", quick), ("default", default)):
        bs = m["cfg"].data.batch_size
        print(f"{name:<12} {m['params']:>9d} {m['n']:>6d} {m['step_s'] * 1e3:>8.1f} {m['iter_s'] * 1e3:>8.1f} "
              f"{bs / m['iter_s']:>10.1f} {m['wall']:>7.1f}")
    print(f"default / quickstart step time: {default['step_s'] / quick['step_s']:.2f}x "
          "(step = train_step; iter adds simulating the batch; median iteration)")
    res = quick["res"]
    window = max(1, len(res.history) // 8)
    print(f"\nquickstart curve (train loss: mean over {window}-step windows; val: {quick['cfg'].data.n_val} samples)")
    for i in range(0, len(res.history), window):
        chunk = res.history[i:i + window]
        print(f"  steps {chunk[0].step:>4d}-{chunk[-1].step:<4d} train loss {statistics.fmean(h.loss for h in chunk):.4f}")
    curve = ([(-1, quick["val0"])] if quick["val0"] else []) + res.val_history
    for step, val in curve:
        print(f"  {'untrained' if step < 0 else f'after step {step:>4d}'}: val loss {val['loss']:.4f}  subspace {val['subspace']:.4f}  "
              f"cov_nmse {val['cov_nmse']:.4f}  aux {val['aux']:.4f}  aux_matched {val['aux_matched']:.3f}")


if __name__ == "__main__":
    main()
