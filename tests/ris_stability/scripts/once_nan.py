"""An outside-style training script (no ris_stability import) whose NaN happens once: one corrupt record
(an all-zero row) in a fixed data set, met once per epoch at the step the data order puts it in. The model
is called with keyword arguments only, the learning-rate schedule returns numpy scalars, the script clips
its gradients and logs through its own logger. ``--shuffle-seed`` seeds the data order; without it the
order differs on every run (the classic unseeded loader)."""
import argparse
import logging

import numpy as np
import torch
from torch import nn

log = logging.getLogger("once_nan")


class RowScale(nn.Module):
    def forward(self, *, h):
        norm = torch.sqrt((h * h).sum(-1, keepdim=True))  # FAULT: sqrt of the corrupt record's zero row
        return h / (norm + 1.0)


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        self.scale = RowScale()
        self.head = nn.Linear(d, 1)

    def forward(self, *, x):
        return self.head(self.scale(h=self.proj(x)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--corrupt-index", type=int, default=0, help="the data set's corrupt record")
    parser.add_argument("--shuffle-seed", type=int, default=None, help="seed of the data order (default: none)")
    args = parser.parse_args()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("once_nan %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    n = args.steps * args.batch
    data = torch.randn(n, 8, generator=torch.Generator().manual_seed(1234))
    data[args.corrupt_index] = 0.0
    target = data.sum(-1, keepdim=True)
    order = torch.Generator()
    if args.shuffle_seed is None:
        order.seed()  # a fresh, non-reproducible data order on every run
    else:
        order.manual_seed(args.shuffle_seed)
    perm = torch.randperm(n, generator=order)

    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: np.float64(0.97) ** epoch)
    for step in range(args.steps):
        idx = perm[step * args.batch:(step + 1) * args.batch]
        loss = nn.functional.mse_loss(model(x=data[idx]), target[idx])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 4 == 0:
            log.info("step %d loss %.4f lr %.4g", step, loss.item(), schedule.get_last_lr()[0])


if __name__ == "__main__":
    main()
