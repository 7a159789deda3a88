"""An outside-style training script (no ris_stability import): a healthy whitening through torch.linalg.eigh
(a well-conditioned covariance, eigenvectors used) next to a row norm by torch.sqrt that meets an all-zero
row from --fault-step on. The eigh is never the cause; the sqrt is."""
import argparse
import logging

import torch
from torch import nn

log = logging.getLogger("eigh_and_sqrt")


class Whiten(nn.Module):
    def forward(self, h):
        cov = h.T @ h / h.shape[0] + torch.eye(h.shape[1])  # eigenvalues >= 1: condition ~ 10
        evals, evecs = torch.linalg.eigh(cov)
        return h @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


class RowNorm(nn.Module):
    def forward(self, h):
        norm = torch.sqrt((h * h).sum(-1, keepdim=True))  # FAULT: sqrt of a zero row
        return h / (norm + 1.0)


class Net(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        self.whiten = Whiten()
        self.norm = RowNorm()
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.whiten(h) + self.norm(h))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--fault-step", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("eigh_and_sqrt").addHandler(logging.NullHandler())
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(args.steps):
        x = torch.randn(64, 4)
        y = x.sum(-1, keepdim=True)
        if step >= args.fault_step:
            x[5] = 0.0
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        log.info("step %d loss %.4f", step, loss.item())


if __name__ == "__main__":
    main()
