"""One rank of a 2-process gloo run for test_distributed.py: a tiny MLP under DDP, driven by MonitorSession.

argv: run_dir mode steps. mode "fault": rank 1's input is NaN at steps 2 and 3 (a planted fault on one rank
only); "die": rank 1 exits abruptly at step 3; "clean": no fault. Each rank writes result<rank>.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ris_stability.monitor import MonitorConfig, MonitorSession, StabilityMonitor

FAULT_STEPS = (2, 3)


def main(run_dir: str, mode: str, steps: int) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own disjoint data
    mon = StabilityMonitor(run_dir, MonitorConfig(policy="skip"))
    stepped, status = [], "clean"
    try:
        with MonitorSession(mon, ddp, opt) as s:
            for step in range(steps):
                x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
                if mode == "fault" and rank == 1 and step in FAULT_STEPS:
                    x[0, 0] = float("nan")
                if mode == "die" and rank == 1 and step == 3:
                    os._exit(3)
                s.start_step(step, {"x": x, "y": y})
                loss = torch.nn.functional.mse_loss(ddp(x), y)
                s.after_forward(loss)
                loss.backward()
                if s.after_backward():
                    opt.step()
                    stepped.append(step)
                opt.zero_grad(set_to_none=True)
                s.end_step()
    except RuntimeError as err:
        status = f"stopped: {err}"
    out = {"rank": rank, "stepped": stepped, "skipped": mon.skipped_steps, "status": status,
           "capsules": [str(p) for p in mon.capsules],
           "params": [p.detach().double().sum().item() for p in model.parameters()]}
    (Path(run_dir) / f"result{rank}.json").write_text(json.dumps(out))
    if status == "clean":
        dist.destroy_process_group()
    return 0 if status == "clean" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
