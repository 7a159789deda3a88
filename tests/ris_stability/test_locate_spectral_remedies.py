"""The locator's remedies for a non-finite eigh / SVD backward, chosen from the evidence of the run: outside-style
losses with planted ties (a rank-deficient SVD projection, a loaded covariance, a loss that uses vectors inside
a cluster)."""
from __future__ import annotations

import torch
from torch import nn

from ris_stability import locate_nonfinite
from tests.ris_stability.test_spectral_svd import rank25_covariance


class TopKLeftProjection(nn.Module):
    """The outside codebase's pattern: project onto the top-K left singular vectors of a covariance."""

    def __init__(self, target: torch.Tensor, k: int = 5):
        super().__init__()
        self.target, self.k = target, k

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        u = torch.linalg.svd(r).U[:, : self.k]
        return ((u @ u.mH) * self.target).sum().real


class LoadedWhitening(nn.Module):
    """eigh of a rank-2 covariance loaded with 1e-2 I: the loading lifts the null space to one tied value."""

    def __init__(self, use_cluster_vector: bool = False):
        super().__init__()
        self.use_cluster_vector = use_cluster_vector

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cov = torch.block_diag(z.mT @ z, torch.zeros(4, 4)) + 1e-2 * torch.eye(6)
        vec = torch.linalg.eigh(cov).eigenvectors
        if self.use_cluster_vector:  # one vector of the tied cluster: no defined gradient
            mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
            return (vec[:, 0] @ mix).square().sum()
        return (vec[:, -2:] @ vec[:, -2:].mT * torch.arange(36.0).view(6, 6)).sum()


def _text(f) -> str:
    return " | ".join((f.cause,) + f.remedies)


def test_rank_deficient_svd_projection_names_svd_floor_and_the_one_line_fix():
    target = torch.randn(144, 144, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    loss = TopKLeftProjection(target)
    f = locate_nonfinite(loss, rank25_covariance(torch.complex64).requires_grad_())
    assert f is not None and f.node == "LinalgSvdBackward0"
    text = _text(f)
    for needed in ("SVD", "singular values", "rank-deficient: loading will not help", "with ris_stability.gap_aware():",
                   "torch.linalg.svd at ", "the gap-aware gradient is exact"):
        assert needed in text, needed
    assert "eigenvalue" not in text and "loss.eigh_backward" not in text
    assert "with ris_stability.gap_aware():" in f.remedies[0]


def test_loaded_covariance_names_the_loading_level():
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(2)).requires_grad_()
    f = locate_nonfinite(LoadedWhitening(), z)
    assert f is not None and f.node == "LinalgEighBackward0"
    text = _text(f)
    assert "eigenvalues" in text and "lifted above the rounding floor" in text and "diagonal loading" in text
    assert "loading will not help" not in text and "singular" not in text
    assert "the gap-aware gradient is exact" in text


def test_loss_on_a_vector_inside_the_cluster_asks_for_a_subspace_loss_first():
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(3)).requires_grad_()
    f = locate_nonfinite(LoadedWhitening(use_cluster_vector=True), z)
    assert f is not None and f.node == "LinalgEighBackward0"
    assert f.remedies[0].startswith("make the loss depend only on a subspace")
    assert "tells the eigenvectors inside the tied cluster apart" in _text(f)
