"""A plain data-parallel training script (no ris_stability import unless --watch), launched by torchrun: it joins the
gloo process group itself, wraps its model in DistributedDataParallel and trains on its own share of the
data. Planted fault on rank 1 only: at each of --fault-steps one row of its batch is all zero, and the row
norm's sqrt backward turns that into NaN gradients (the loss stays finite). --params DIR: each rank writes
its final parameter sums to DIR/params<rank>.json (the replicas must stay identical). --abort-at-exit: rank
1 aborts when its interpreter exits, as torch 2.13's gloo teardown sometimes does by itself. --watch DIR: the
loop runs inside ``ris_stability.watch(model, optimizer, out=DIR)`` (the one-line form in one's own script).
--no-group: no process group and no DDP (each rank trains alone; its rank comes from torchrun's RANK).
--abort-once PATH: after training, rank 1 waits for PATH to exist and then aborts."""
import argparse
import atexit
import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


class RowNorm(nn.Module):
    def forward(self, h):
        norm = torch.sqrt((h * h).sum(-1, keepdim=True))  # FAULT: sqrt of a zero-norm row
        return h / (norm + 1.0)


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        self.norm = RowNorm()
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--fault-steps", type=int, nargs="*", default=[2])
    p.add_argument("--params", default="")
    p.add_argument("--abort-at-exit", action="store_true")
    p.add_argument("--watch", default="")
    p.add_argument("--no-group", action="store_true")
    p.add_argument("--abort-once", default="")
    args = p.parse_args()
    if args.no_group:
        rank = int(os.environ["RANK"])
    else:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    if args.abort_at_exit and rank == 1:
        atexit.register(os.abort)
    torch.manual_seed(0)
    model = Net() if args.no_group else nn.parallel.DistributedDataParallel(Net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(10 + rank)
    if args.watch:
        import ris_stability

        watched = ris_stability.watch(model, optimizer, out=args.watch)
    else:
        watched = contextlib.nullcontext()
    with watched:
        for step in range(args.steps):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
            if rank == 1 and step in args.fault_steps:
                x[3] = 0.0
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if args.params:
        sums = [p.detach().double().sum().item() for p in model.parameters()]
        (Path(args.params) / f"params{rank}.json").write_text(json.dumps(sums))
    if args.abort_once and rank == 1:  # a peer that dies while rank 0 writes its run: torchrun stops rank 0
        deadline = time.monotonic() + 120
        while not Path(args.abort_once).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.abort()
    if not args.no_group:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
