"""One rank of a 2-process gloo run for test_distributed.py: a tiny MLP under DDP, driven by MonitorSession.

argv: run_dir mode steps. mode "fault": rank 1's input is NaN at steps 2 and 3 (a planted fault on one rank
only); "gradnan": at step 2 rank 1's loss gains a term whose value is 0 but whose backward puts NaN in the
last layer's bias gradient only (the other local gradients stay finite); "lossnan": at step 2 rank 1's loss
is NaN while all its gradients stay finite (a NaN constant added); "die": rank 1 exits abruptly at
step 3; "clean": no fault; "reads": no fault, the toolkit's host reads counted per step. Each rank writes result<rank>.json. ``replay`` rebuilds a capsule's step in one
process (``risdiag bisect CAPSULE --replayer ddp_worker.py:replay``).
"""

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor

FAULT_STEPS = (2, 3)
GRADNAN_STEP = 2


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def step_loss(net: torch.nn.Module, batch: dict, model: torch.nn.Module | None = None) -> torch.Tensor:
    """The step's loss; ``net`` runs the forward (the DDP wrapper or the bare ``model``)."""
    model = net if model is None else model
    loss = torch.nn.functional.mse_loss(net(batch["x"]), batch["y"])
    if batch["gradnan"]:  # sqrt'(0) = inf times abs'(0) = 0: NaN in the bias gradient, the loss unchanged
        loss = loss + torch.sqrt(torch.abs(model[2].bias * 0)).sum()
    return loss


class Replayed:
    def __init__(self, model: torch.nn.Module, batch: dict):
        self.model, self.batch, self.roots = model, batch, {"model": model}

    def loss(self) -> torch.Tensor:
        return step_loss(self.model, self.batch)


def replay(capsule, dtype=None) -> Replayed:
    model = build()
    model.load_state_dict(capsule.model_state)
    batch = dict(capsule.batch["batch"])
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
        batch.update(x=batch["x"].to(getattr(torch, dtype)), y=batch["y"].to(getattr(torch, dtype)))
    return Replayed(model, batch)


def main(run_dir: str, mode: str, steps: int) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own disjoint data
    mon = StabilityMonitor(run_dir, MonitorConfig(policy="skip"))
    stepped, captured, status = [], [], "clean"
    counter = contextlib.nullcontext()
    if mode == "reads":  # count the toolkit's host reads per step (tests/ris_stability/host_reads.py)
        from tests.ris_stability.host_reads import counting
        counter = counting()
    try:
        with counter as reads, MonitorSession(mon, ddp, opt) as s:
            for step in range(steps):
                x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
                if mode == "fault" and rank == 1 and step in FAULT_STEPS:
                    x[0, 0] = float("nan")
                if mode == "die" and rank == 1 and step == 3:
                    os._exit(3)
                batch = {"x": x, "y": y, "gradnan": mode == "gradnan" and rank == 1 and step == GRADNAN_STEP}
                s.start_step(step, batch)
                loss = step_loss(ddp, batch, model)
                if mode == "lossnan" and rank == 1 and step == GRADNAN_STEP:
                    loss = loss + torch.tensor(float("nan"))  # no gradient: the local gradients stay finite
                s.after_forward(loss)
                loss.backward()
                if mon.dist.local_grads is not None:
                    captured.append(step)
                if s.after_backward():
                    opt.step()
                    stepped.append(step)
                opt.zero_grad(set_to_none=True)
                s.end_step()
    except RuntimeError as err:
        status = f"stopped: {err}"
    out = {"rank": rank, "stepped": stepped, "captured": captured, "skipped": mon.skipped_steps, "status": status,
           "capsules": [str(p) for p in mon.capsules],
           "params": [p.detach().double().sum().item() for p in model.parameters()],
           "reads": {str(k): v for k, v in reads.by_step.items()} if reads is not None else None,
           "read_where": {str(k): v for k, v in reads.where.items()} if reads is not None else None,
           "copies": {str(k): v for k, v in reads.copies.items()} if reads is not None else None}
    (Path(run_dir) / f"result{rank}.json").write_text(json.dumps(out))
    if status == "clean":
        dist.destroy_process_group()
    return 0 if status == "clean" else 1


if __name__ == "__main__":
    code = main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    # Everything is written: skip the interpreter's teardown, where torch 2.13's gloo can abort a process that
    # has destroyed its group ("terminate called without an active exception", ~1 run in 10 here).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
