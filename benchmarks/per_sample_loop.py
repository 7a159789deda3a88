"""Monitor overhead on a per-sample-loop model: many small torch.linalg.eig calls per step.

The model has the shape of learned root-MUSIC / ESPRIT networks: a learned Hermitian covariance
(complex64, 8x8) decomposed with torch.linalg.eig one sample at a time in a Python loop, a phase-invariant
projector loss. Three variants run interleaved in one process (off, monitor with the probe's batched
statistics, monitor measuring every call on its own), so machine load affects all alike; the figure is
the mean step time over all steps of all rounds, and the ratios to "off".
Usage: python benchmarks/per_sample_loop.py [--steps 40] [--rounds 3] [--batch 32]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor

N, R, K, D = 8, 3, 2, 6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = nn.Linear(D, 32), nn.Linear(32, 2 * N * R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(torch.tanh(self.enc(x))).view(-1, N, R, 2)
        return torch.complex(f[..., 0], f[..., 1])


def loss_fn(F: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    total = F.new_zeros((), dtype=torch.float32)
    for b in range(F.shape[0]):
        w, V = torch.linalg.eig(F[b] @ F[b].mH)
        top = V[:, w.real.argsort(descending=True)[:K]]
        total = total + (top @ top.mH - target[b]).abs().square().sum()
    return total / F.shape[0]


def run(variant: str, steps: int, batch: int) -> list[float]:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.randn(batch, D)
    q, _ = torch.linalg.qr(torch.randn(batch, N, K, dtype=torch.complex64))
    target = q @ q.mH
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        session = None
        if variant != "off":
            session = MonitorSession(StabilityMonitor(tmp, MonitorConfig(policy="observe")), net, opt)
            session.__enter__()
            session.monitor.probe.batch_calls = variant == "batched"
        for step in range(steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if session:
                session.start_step(step)
            loss = loss_fn(net(x), target)
            if session:
                session.after_forward(loss)
            loss.backward()
            if session is None or session.after_backward():
                opt.step()
            if session:
                session.end_step()
            times.append(time.perf_counter() - t0)
        if session:
            session.__exit__(None, None, None)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32, help="samples per step (eig calls per step)")
    args = p.parse_args()
    variants = ("off", "batched", "per-call")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            times[v] += run(v, args.steps, args.batch)
    off = statistics.mean(times["off"])
    print(f"per-sample loop: {args.batch} eig calls of 8x8 complex64 per step, {args.steps} steps x "
          f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for v in variants:
        mean = statistics.mean(times[v])
        print(f"{v:>9}: mean step {mean * 1e3:7.2f} ms  ratio to off {mean / off:5.2f}x")


if __name__ == "__main__":
    main()
