"""Replay time of one quickstart training step under the NaN locator vs a plain forward + backward.

The locator is only used on replay (``risdiag bisect``); this prints what that replay costs relative to
the step itself, measured in one process (plain and located runs alternate; medians). Usage: python benchmarks/bisect_bench.py [--repeats 7] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ris_model.config import dumps_toml, load_config
from ris_model.data import train_batch
from ris_model.model import build_model
from ris_model.simulate import make_system
from ris_model.train import configure_threads
from ris_stability.records.capsule import Capsule, capture_rng
from ris_stability.integrations.ris import REPLAYER, batch_state, replay_capsule
from ris_stability.locate import Locator

ROOT = Path(__file__).resolve().parents[1]


def make_capsule(config: str) -> Capsule:
    cfg = load_config(ROOT / "configs" / config)
    system = make_system(cfg)
    model = build_model(cfg, system)
    return Capsule(step=0, batch=batch_state(train_batch(cfg, system, 0)), model_state=model.state_dict(),
                   optimizer_state=None, rng=capture_rng(), config_text=dumps_toml(cfg), meta={"replayer": REPLAYER})


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
GOAL = 1.3  # issue #28: the locator costs at most 1.3x a plain step while armed


def timed_pairs(a, b, repeats: int, clock=time.perf_counter) -> tuple[float, float, float]:
    """Median times of ``a`` and ``b`` run alternately (a, b, b, a, ...: neither always runs first), and
    the median of the per-pair ratios b / a."""
    ta, tb = [], []
    for i in range(repeats):
        for fn, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = clock()
            fn()
            out.append(clock() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median([y / x for x, y in zip(ta, tb)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="quickstart.toml")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: the process's CPU time (other jobs' time slices are not charged to either mode)")
    args = ap.parse_args()
    capsule = make_capsule(args.config)
    rep = replay_capsule(capsule)
    configure_threads(rep.cfg)  # the thread count training uses (train.threads)

    def plain() -> None:
        rep.model.zero_grad(set_to_none=True)
        rep.loss().backward()

    def located() -> None:
        rep.model.zero_grad(set_to_none=True)
        assert Locator(roots=rep.roots).run(rep.loss) is None

    plain()  # warm up
    located()
    t_plain, t_loc, ratio = timed_pairs(plain, located, args.repeats, CLOCKS[args.clock])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {args.config}, "
          f"batch {rep.batch.size}, median of {args.repeats} interleaved pairs, {args.clock} clock")
    print(f"plain step (forward+backward): {t_plain * 1e3:8.1f} ms")
    print(f"under the locator:             {t_loc * 1e3:8.1f} ms")
    print(f"ratio locator / plain:         {ratio:8.2f}x (median of the per-pair ratios; goal <= {GOAL}x: "
          f"{'met' if ratio <= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
