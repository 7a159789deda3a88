"""An outside-style loop (no ris_stability import) whose own gate skips optimizer.step() on chosen iterations,
with zero_grad at the top of the loop, and optional gradient accumulation (zero_grad only after a step)."""
import argparse

import torch
from torch import nn


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip", type=int, nargs="*", default=[2], help="iterations the script does not step")
    parser.add_argument("--accumulate", type=int, default=1, help="backward calls per optimizer step")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(args.steps):
        if args.accumulate == 1:
            optimizer.zero_grad()
        for _ in range(args.accumulate):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
        if step in args.skip:
            continue
        optimizer.step()
        if args.accumulate > 1:
            optimizer.zero_grad()


if __name__ == "__main__":
    main()
