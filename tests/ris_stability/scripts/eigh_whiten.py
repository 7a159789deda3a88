"""A plain training script (no ris_stability import): a ZCA whitening layer through torch.linalg.eigh.
From --fault-step on the batch is all zeros (a dead sensor), so the loaded covariance eps * I has tied
eigenvalues and eigh backward divides 0 by their zero gaps."""
import argparse

import torch
from torch import nn


class Whiten(nn.Module):
    def __init__(self, eps=1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, h):
        cov = h.T @ h / h.shape[0] + self.eps * torch.eye(h.shape[1])
        evals, evecs = torch.linalg.eigh(cov)  # FAULT: tied eigenvalues, eigenvectors used
        return h @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


class Net(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d, d, bias=False), Whiten())
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.features(x))


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
        x = torch.randn(32, 6)
        y = x[:, :1]
        if step >= args.fault_step:
            x = torch.zeros_like(x)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if args.save:
        torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
