"""A plain training script (no ris_stability import): nested modules, Adam, and a row norm by torch.sqrt
that meets an all-zero row from step --fault-step on (a dead input row through a bias-free layer)."""
import argparse

import torch
from torch import nn


class RowNorm(nn.Module):
    def forward(self, h):
        norm = torch.sqrt((h * h).sum(-1, keepdim=True))  # FAULT: sqrt of a zero-norm row
        return h / (norm + 1.0)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        self.norm = RowNorm()

    def forward(self, x):
        return self.norm(self.proj(x))


class Encoder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.encoder = Encoder(d)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.encoder(x))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--fault-step", type=int, default=5)
    parser.add_argument("--save", default=None, help="write the final parameters here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(args.steps):
        x = torch.randn(16, 8)
        y = x.sum(-1, keepdim=True)
        if step >= args.fault_step:
            x[3] = 0.0
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if args.save:
        torch.save(model.state_dict(), args.save)
    print("trained", args.steps, "steps")


if __name__ == "__main__":
    main()
