"""An outside-style training script for the sweep tests: plain argparse, no ris_stability import.

Full-batch linear regression by gradient descent with a square-root norm penalty. Two regions of its
(lr, eps) space break, each in its own way:

- ``eps`` below minus the initial squared weight norm (about -0.3): the penalty takes the square root of a
  negative number, so the loss and the gradients are NaN from step 0 on (the op is ``sqrt``);
- ``lr`` above about 0.6: gradient descent diverges, the gradient norm grows by a constant factor per step
  (2.4x at lr 1) and stays finite for tens of steps.

It prints one JSON line at the end: the validation loss, the script's own measure of the result.
"""

import argparse
import json
import time

import torch


class Regression(torch.nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.linear = torch.nn.Linear(8, 1, bias=False)
        self.eps = eps

    def forward(self, x):
        penalty = torch.sqrt(self.linear.weight.pow(2).sum() + self.eps)
        return self.linear(x), penalty


parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, required=True)
parser.add_argument("--eps", type=float, default=0.1)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (tests that kill a trial)")
args = parser.parse_args()

torch.manual_seed(0)
x, xv = torch.randn(64, 8), torch.randn(64, 8)
w_true = torch.randn(8, 1)
y, yv = x @ w_true, xv @ w_true
model = Regression(args.eps)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

for step in range(args.steps):
    optimizer.zero_grad()
    pred, penalty = model(x)
    loss = ((pred - y) ** 2).mean() + 1e-3 * penalty
    loss.backward()
    optimizer.step()
    time.sleep(args.sleep)

with torch.no_grad():
    val_loss = float(((model(xv)[0] - yv) ** 2).mean())
print(f"trained {args.steps} steps at lr {args.lr}")
print(json.dumps({"val_loss": val_loss}))
