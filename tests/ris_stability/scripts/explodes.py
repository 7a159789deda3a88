"""A plain training script (no ris_stability import) whose learning rate is too large: a small learned
subspace model (two convolutions, a per-sample covariance, its eigenvalues by torch.linalg.eigvals) trained
with SGD. The loss is quartic in the weights, so each too-large update makes the next gradient larger: the
gradient norm goes 31 -> 5.9e2 -> 5.4e10 (all finite) over steps 0-2 (the SGD update of step 0 is 0.92x the
weights' norm, of step 1 11x, of step 2 1e8x), the update of step 2 sends the weights to ~1e9, and at step 3
the covariance overflows and eigvals raises "input tensor should not contain infs or NaNs". With --lr 0.002
it trains quietly (a clean run)."""
import argparse
import logging

import numpy as np
import torch
from torch import nn

log = logging.getLogger("explodes")


class Subspace(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 3, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, *, x: torch.Tensor) -> torch.Tensor:
        h = self.conv3(self.conv1(x))
        cov = h @ h.transpose(1, 2) / h.shape[-1]
        return torch.stack([torch.linalg.eigvals(c) for c in cov]).real  # raises on an inf / NaN covariance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--log-every", type=int, default=2)
    parser.add_argument("--save", default=None, help="write the final parameters here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(0)
    model = Subspace()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: np.float64(1.0))  # numpy scalars
    x = torch.randn(8, 1, 16)
    for step in range(args.steps):
        eigenvalues = model(x=x)
        loss = (eigenvalues.amax(-1) - 10.0).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % args.log_every == 0:  # its own step gate
            log.info("step %d loss %.4g", step, loss.item())
    if args.save:
        torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
