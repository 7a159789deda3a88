"""Step time of 2 ranks (DDP, gloo, CPU) vs 1 process at the same global batch, and the monitor's
overhead under DDP (monitor on vs off, interleaved rounds in one run).

    PYTHONPATH=. python benchmarks/ddp_bench.py [--steps 20] [--rounds 3] [--batch 512] [--every 1 10]

The parent launches the workers (1 process, then 2 ranks); each worker trains a small MLP and times
rounds of steps alternately with and without the StabilityMonitor attached, and rank 0 prints its means,
for each ``--every`` (statistics every step, and every 10th step: mostly the fixed cost of a step not sampled).
On a shared or 2-core machine the 2-rank figure mostly measures contention: read it as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]


def _model():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 1))


def _round(model, opt, x, y, steps: int, session) -> float:
    import torch
    t0 = time.perf_counter()
    for step in range(steps):
        if session is not None:
            session.start_step(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if session is not None:
            session.after_forward(loss)
        loss.backward()
        if session is None or session.after_backward():
            opt.step()
        opt.zero_grad(set_to_none=True)
        if session is not None:
            session.end_step()
    return (time.perf_counter() - t0) / steps


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    net = _model()
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch // world, 64, generator=gen), torch.randn(args.batch // world, 1, generator=gen)
    _round(model, opt, x, y, 3, None)  # warm-up
    off: list[float] = []
    on: dict[int, list[float]] = {every: [] for every in args.every}
    with TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            off.append(_round(model, opt, x, y, args.steps, None))
            for every in args.every:
                with MonitorSession(StabilityMonitor(Path(tmp) / f"r{i}-e{every}", MonitorConfig(every=every)),
                                    model, opt) as s:
                    on[every].append(_round(model, opt, x, y, args.steps, s))
    if rank == 0:
        print(json.dumps({"world": world, "off_ms": 1e3 * sum(off) / len(off),
                          "on_ms": {str(every): 1e3 * sum(t) / len(t) for every, t in on.items()}}))
    if world > 1:
        dist.destroy_process_group()


def _launch(n: int, args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--rounds", str(args.rounds),
           "--batch", str(args.batch), "--every", *map(str, args.every)]
    procs = []
    for r in range(n):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(r), "WORLD_SIZE": str(n), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=512, help="global batch (split across the ranks)")
    p.add_argument("--every", type=int, nargs="+", default=[1, 10],
                   help="statistics every N steps, one monitored run per value in each round")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    one, two = _launch(1, args), _launch(2, args)
    print(f"global batch {args.batch}, {args.rounds} interleaved rounds of {args.steps} steps, 1 thread per rank")
    for r in (one, two):
        print(f"{r['world']} rank(s): {r['off_ms']:.2f} ms/step without monitor; with it: " + "; ".join(
            f"every={every} {ms:.2f} ms/step (monitor overhead x{ms / r['off_ms']:.2f})"
            for every, ms in r["on_ms"].items()))
    print(f"2-rank vs 1-rank step time (monitor off): x{two['off_ms'] / one['off_ms']:.2f}; (monitor on): " + "; ".join(
        f"every={every} x{two['on_ms'][every] / one['on_ms'][every]:.2f}" for every in one["on_ms"]))


if __name__ == "__main__":
    main()
