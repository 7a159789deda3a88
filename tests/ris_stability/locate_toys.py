"""Toy modules with planted faults for the locator tests, and the marker lookup they use.

A line that should be named by a finding ends with ``# <marker>``; ``line_of`` finds it in any
locator test file, so a toy may live here or next to the test that uses it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ris_stability import Finding
HERE = Path(__file__).resolve().parent
LOCATE_FILES = ("locate_toys.py", "test_locate.py", "test_locate_forward.py", "test_locate_backward.py")


def line_of(marker: str) -> str:
    """'<file>.py:LINE' of the one line carrying ``# <marker>`` in the locator test files."""
    hits = [f"{name}:{i + 1}" for name in LOCATE_FILES
            for i, text in enumerate((HERE / name).read_text().splitlines())
            if text.rstrip().endswith(f"# <{marker}>")]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def assert_at(finding: Finding, marker: str) -> None:
    assert finding.location.endswith(line_of(marker)), (finding.location, line_of(marker))


class LogHead(nn.Module):
    def forward(self, x):
        return torch.log(x)  # <log>


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = LogHead()

    def forward(self, x):
        return self.head(x).sum()


class Ratio(nn.Module):
    def forward(self, x, shift):
        d = x - shift
        return d / d  # <ratio>


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Ratio()

    def forward(self, x, shift):
        return self.inner(x, shift)


class Deep(nn.Module):
    """The NaN is born in block.inner and then crosses four more ops before the loss."""

    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x, shift):
        r = self.block(x, shift)
        return ((r * 2.0 + 1.0).tanh() ** 2).mean()


class Branch(nn.Module):
    def forward(self, x):
        return torch.log(x).sum()  # <branch>


class Siblings(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Branch()
        self.second = Branch()

    def forward(self, x):
        return self.first(x + 1.0) + self.second(x)


class SqrtNorm(nn.Module):
    def forward(self, v):
        return torch.sqrt((v * v).sum(-1)).sum()  # <sqrt>


class Projector(nn.Module):
    """Shrinkage A = (1 - a) B + a tr(B)/N I, then a projector loss on the top-k eigenvectors."""

    def __init__(self, k: int, alpha: float = 1e-3):
        super().__init__()
        self.k, self.alpha = k, alpha

    def forward(self, B, W):
        n = B.shape[-1]
        tr = B.diagonal(dim1=-2, dim2=-1).real.sum(-1)[..., None, None]
        A = (1 - self.alpha) * B + self.alpha * tr / n * torch.eye(n, dtype=B.dtype, device=B.device)
        _, V = torch.linalg.eigh(A)  # <eigh>
        Vs = V[..., -self.k:]
        return ((Vs @ Vs.mH).real * W).sum()


class Loss(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.subspace = Projector(k)

    def forward(self, B, W):
        return self.subspace(B, W)


def low_rank_psd(batch: int, n: int, rank: int, dtype=torch.complex64, seed: int = 0) -> torch.Tensor:
    """Rank-``rank`` Hermitian PSD matrices with exact zero rows beyond ``rank``, trace n."""
    g = torch.Generator().manual_seed(seed)
    X = torch.zeros(batch, n, rank, dtype=dtype)
    X[:, :rank] = torch.randn(batch, rank, rank, dtype=dtype, generator=g)
    B = X @ X.mH
    return B / B.diagonal(dim1=-2, dim2=-1).real.sum(-1)[..., None, None] * n


class Whitener(nn.Module):
    def forward(self, A):
        return torch.linalg.cholesky(A).sum()  # <cholesky>
