"""Outside-style training steps for the overhead benchmark: models that know nothing of ris_diag.

Each ``build_*`` returns a :class:`Workload`: a model, its optimizer and a ``loss(step)`` closure over a
fixed, seeded batch, so that every run of a workload computes the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Workload:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[int], torch.Tensor]


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a clock read after it times that work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def session_step(session, work: "Workload", step: int) -> None:
    """One training step of ``work`` driven through a MonitorSession, as a loop with its own step gate writes it."""
    session.start_step(step)
    work.optimizer.zero_grad(set_to_none=True)
    loss = work.loss(step)
    session.after_forward(loss)
    loss.backward()
    if session.after_backward():
        work.optimizer.step()
    session.end_step()


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 128, d: int = 64, heads: int = 4, layers: int = 2, context: int = 32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build_gpt(device: str = "cpu") -> Workload:
    torch.manual_seed(0)
    model = TinyGPT().to(device)
    data = torch.randint(0, 128, (16, 33), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss(step: int) -> torch.Tensor:
        logits = model(data[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
    return Workload(model, opt, loss)


class Whitening(nn.Module):
    """ZCA whitening of the batch through eigh (eigenvectors used), then a linear read-out."""

    def __init__(self, d: int = 24, out: int = 8):
        super().__init__()
        self.mix, self.read = nn.Linear(d, d), nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mix(x)
        z = z - z.mean(0)
        cov = z.T @ z / z.shape[0] + 1e-3 * torch.eye(z.shape[1], device=z.device)
        lam, vec = torch.linalg.eigh(cov)
        return self.read(z @ (vec * lam.rsqrt()) @ vec.T)


def build_whitening(device: str = "cpu") -> Workload:
    torch.manual_seed(0)
    model = Whitening().to(device)
    x, y = torch.randn(128, 24, device=device), torch.randn(128, 8, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    return Workload(model, opt, lambda step: F.mse_loss(model(x), y))


class PerSample(nn.Module):
    """A per-sample loop of small linear algebra: for each sample an 8x8 SPD matrix, its eigh and a solve."""

    def __init__(self, features: int = 6, n: int = 8):
        super().__init__()
        self.factor = nn.Linear(features, n * n)
        self.n = n

    def forward(self, x: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        a = self.factor(x).view(-1, self.n, self.n)
        total = x.new_zeros(())
        for i in range(a.shape[0]):
            r = a[i] @ a[i].T + 0.5 * torch.eye(self.n, device=x.device)
            lam, vec = torch.linalg.eigh(r)
            sol = torch.linalg.solve(r, rhs[i])
            total = total + vec[:, -1].abs().sum() + lam.log().sum() * 1e-2 + sol.square().sum() * 1e-2
        return total / a.shape[0]


def build_per_sample(device: str = "cpu") -> Workload:
    torch.manual_seed(0)
    model = PerSample().to(device)
    x, rhs = torch.randn(16, 6, device=device), torch.randn(16, 8, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Workload(model, opt, lambda step: model(x, rhs))


WORKLOADS: dict[str, Callable[[str], Workload]] = {
    "gpt": build_gpt, "whiten": build_whitening, "persample": build_per_sample,
}
DESCRIPTIONS = {
    "gpt": "tiny GPT (2 layers, d=64, 16x32 tokens), no linear algebra",
    "whiten": "ZCA whitening via eigh of a 24x24 covariance",
    "persample": "per-sample loop: 16 x (eigh + solve) of 8x8 matrices",
}
