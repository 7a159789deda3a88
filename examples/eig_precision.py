"""Is this gradient right? A learned root-MUSIC-style loss through torch.linalg.eig in complex64.

A network predicts a Hermitian covariance scale * F F^H (8x8, complex64); the loss compares the projector
onto its top-2 eigenvectors, found with torch.linalg.eig one sample at a time, with a target. At high
scale (large eigenvalues) the complex64 eig backward is dominated by rounding. The precision audit
recomputes the step in float64 and names the op and the cause:

    python examples/eig_precision.py [--scale 1e10]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from ris_stability import audit_precision
from ris_stability.instruments.precision import format_audit

N, R, K, D = 8, 3, 2, 6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = nn.Linear(D, 16), nn.Linear(16, 2 * N * R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(torch.tanh(self.enc(x))).view(-1, N, R, 2)
        return torch.complex(f[..., 0], f[..., 1])


def loss_fn(net: Net, x: torch.Tensor, scale: float, target: torch.Tensor) -> torch.Tensor:
    F, total = net(x), torch.zeros(())
    for b in range(F.shape[0]):
        w, V = torch.linalg.eig(scale * (F[b] @ F[b].mH))
        top = V[:, w.real.argsort(descending=True)[:K]]  # eig's order is unspecified
        total = total + (top @ top.mH - target[b]).abs().square().sum()
    return total / F.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description="precision audit of an eig-based loss")
    p.add_argument("--scale", type=float, default=1e10, help="covariance scale (eigenvalues ~ 10 x scale)")
    args = p.parse_args()
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, D)
    q, _ = torch.linalg.qr(torch.randn(4, N, K, dtype=torch.complex64))
    print(format_audit(audit_precision(loss_fn, net, x, args.scale, q @ q.mH)))


if __name__ == "__main__":
    main()
