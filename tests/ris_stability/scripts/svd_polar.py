"""A plain training script (no ris_stability import): a layer that multiplies by the orthogonal polar
factor U @ Vh of torch.linalg.svd. From --fault-step on the batch is all zeros, so the matrix the layer
decomposes is eps * I, whose singular values are tied: svd backward divides 0 by s_i^2 - s_j^2 = 0."""
import argparse

import torch
from torch import nn


class PolarMix(nn.Module):
    def __init__(self, d, eps=1e-3):
        super().__init__()
        self.eps = eps
        self.d = d

    def forward(self, h):
        gram = h.T @ h / h.shape[0] + self.eps * torch.eye(self.d)
        U, S, Vh = torch.linalg.svd(gram)  # FAULT: tied singular values, and U @ Vh uses the vectors
        rotation = U @ Vh
        return h @ rotation


class Net(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.embed = nn.Linear(d, d, bias=False)
        self.mix = PolarMix(d)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.mix(self.embed(x)))


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
