"""A research-style training script (no ris_stability import) that hides its NaN, the way the seed problem's own
code did: the loss goes through the top singular vectors of a rank-deficient covariance (SVD backward 0/0 on
its tied zero singular values), and between backward and step the script replaces non-finite gradients with
zeros, clips, and gates optimizer.step() on its own check. Logs through its own logger."""
import argparse
import logging

import torch
from torch import nn

log = logging.getLogger("svd_hides_nan")


class Subspace(nn.Module):
    """Projects features on the top-k left singular vectors of their sample covariance, the features zero-padded to
a fixed width first (as padded research code does): the padding's exact zero rows and columns make the
covariance rank-deficient, with exactly tied zero singular values."""

    def __init__(self, k=2):
        super().__init__()
        self.k = k
        self.pad = True

    def forward(self, h):
        if self.pad:
            h = torch.cat([h, torch.zeros(h.shape[0], 4)], dim=1)  # padded to 12 features
        cov = h.T @ h / h.shape[0]  # exactly tied zero singular values from the padding
        U, S, Vh = torch.linalg.svd(cov)  # FAULT: vectors of tied singular values used below
        return h @ U[:, : self.k]


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.sub = Subspace()
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.sub(self.embed(x)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--clean-until", type=int, default=0, help="no padding (no fault) before this step")
    parser.add_argument("--anomaly", action="store_true", help="the script's own torch.autograd anomaly mode")
    args = parser.parse_args()
    torch.autograd.set_detect_anomaly(args.anomaly)
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(args.steps):
        x = torch.randn(args.rows, 8)
        model.sub.pad = step >= args.clean_until
        loss = (model(x) - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        bad = any(not torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if bad:
            log.warning("step %d: non-finite gradients replaced, step skipped", step)
            continue
        optimizer.step()


if __name__ == "__main__":
    main()
