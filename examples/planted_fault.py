"""A small training script with a planted fault, for `risdiag trace` (it does not import ris_stability).

A ZCA whitening layer decorrelates features with torch.linalg.eigh. From step 8 on the input sensor dies
(an all-zero batch): the covariance becomes eps * I, its eigenvalues tie exactly, and eigh's backward
divides 0 by their zero gaps, so every gradient turns NaN while the loss stays finite.

    risdiag trace --out runs/planted -- python examples/planted_fault.py --steps 20
    risdiag bisect runs/planted --replayer examples/planted_fault.py:replay

``replay`` at the bottom is the replayer for `risdiag bisect` (see the README, "Replaying later").
"""
import argparse
from types import SimpleNamespace

import torch
from torch import nn


class Whiten(nn.Module):
    def __init__(self, eps=1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, h):
        cov = h.mT @ h / h.shape[0] + self.eps * torch.eye(h.shape[1], dtype=h.dtype)
        evals, evecs = torch.linalg.eigh(cov)
        return h @ evecs @ torch.diag(evals.rsqrt()) @ evecs.mT


class Net(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d, d, bias=False), Whiten())
        self.head = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.head(self.features(x))


def target(x):
    return x[:, :1] - x[:, 1:2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dead-sensor-from", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        x = torch.randn(64, 6)
        if step >= args.dead_sensor_from:
            x = torch.zeros_like(x)
        loss = nn.functional.mse_loss(model(x), target(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"done: {args.steps} steps, last loss {loss.item():.4f}")


def replay(capsule, dtype=None):
    """Rebuild one captured step: the model with the capsule's pre-step weights and the step's input
    (``capsule.batch["inputs"]["model"]["args"]``: what ``model(...)`` was called with)."""
    model = Net()
    model.load_state_dict(capsule.model_state)
    x = capsule.batch["inputs"]["model"]["args"][0]
    if dtype is not None:
        model, x = model.to(getattr(torch, dtype)), x.to(getattr(torch, dtype))
    return SimpleNamespace(model=model, roots={"model": model},
                           loss=lambda: nn.functional.mse_loss(model(x), target(x)))


if __name__ == "__main__":
    main()
