"""Step time of a plain training loop under `ris_stability.watch` (hooks find model, steps and loss) vs
the same loop driven by hand through an explicit `MonitorSession` vs no monitor.

One process, rounds interleaved (off, session, watch; the order rotating each round), mean over all steps after a warm-up, so
machine load affects the three alike. The model: a small MLP plus an eigh whitening layer (the probe has
a linear-algebra call to record). Usage: python benchmarks/autoattach_overhead.py [--steps 200] [--rounds 6]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ris_stability
from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor


class Whiten(nn.Module):
    def forward(self, h):
        cov = h.mT @ h / h.shape[0] + 1e-2 * torch.eye(h.shape[1])
        evals, evecs = torch.linalg.eigh(cov)
        return h @ evecs @ torch.diag(evals.rsqrt()) @ evecs.mT


def model_and_data(steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16), Whiten(), nn.Linear(16, 1))
    data = [(torch.randn(128, 32), torch.randn(128, 1)) for _ in range(steps)]
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), data


def loop(model, opt, data, session=None) -> float:
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(data):
        if session is not None:
            session.start_step(i, (x, y))
        loss = nn.functional.mse_loss(model(x), y)
        if session is not None:
            session.after_forward(loss)
        opt.zero_grad()
        loss.backward()
        if session is None or session.after_backward():
            opt.step()
        if session is not None:
            session.end_step()
    return (time.perf_counter() - t0) / len(data)


def run(kind: str, steps: int, every: int, tmp: Path) -> float:
    model, opt, data = model_and_data(steps)
    out = tmp / f"{kind}-{time.perf_counter_ns()}"
    if kind == "off":
        return loop(model, opt, data)
    if kind == "session":
        mon = StabilityMonitor(out, MonitorConfig(every=every))
        with MonitorSession(mon, model, opt) as s:
            return loop(model, opt, data, s)
    with ris_stability.watch(model, opt, out=out, every=every, report=False):
        return loop(model, opt, data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--every", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"off": [], "session": [], "watch": []}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in times:  # warm-up round, not counted
            run(kind, 20, args.every, Path(tmp))
        kinds = list(times)
        for r in range(args.rounds):  # the order rotates every round: drift in machine load cancels
            for kind in kinds[r % 3:] + kinds[: r % 3]:
                times[kind].append(run(kind, args.steps, args.every, Path(tmp)))
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    print(f"mean step time over {args.rounds} x {args.steps} steps (every={args.every}, 1 thread): "
          + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in mean.items()))
    print(f"session / off = {mean['session'] / mean['off']:.3f}x   watch / off = {mean['watch'] / mean['off']:.3f}x   "
          f"watch / session = {mean['watch'] / mean['session']:.3f}x")


if __name__ == "__main__":
    main()
