"""eig under the locator: its own cause rule (LinalgEigBackward0) and the complex-phase check that
PyTorch skips under a dispatch mode."""
from __future__ import annotations

import torch
from torch import nn

from ris_stability.locate import Locator
from ris_stability.locate.causes import Observation, explain


class TiedEig(nn.Module):
    """eig of diag(1, 1, 2): an exact tie whose eigenvectors the (phase-invariant) loss uses."""

    def __init__(self) -> None:
        super().__init__()
        self.d = nn.Parameter(torch.tensor([1.0, 1.0, 2.0]))

    def forward(self) -> torch.Tensor:
        w, V = torch.linalg.eig(torch.diag(self.d))
        return (V.abs() ** 2)[0].sum() + w.real.sum()


class PhaseDependent(nn.Module):
    """A loss on the raw real part of a complex eigenvector: ill-defined (depends on its phase)."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))

    def forward(self) -> torch.Tensor:
        _, V = torch.linalg.eig(self.A)
        return V[:, 0].real.sum()


def test_eig_backward_through_a_tie_has_its_own_cause():
    model = TiedEig()
    finding = Locator(roots={"model": model}).run(model)
    assert finding is not None and (finding.phase, finding.node) == ("backward", "LinalgEigBackward0")
    assert "general eig through exactly tied eigenvalues (cluster of 2" in finding.cause
    assert "torch.linalg.eigh" in finding.remedies[0]
    spectral = next(s.spectral for s in finding.inputs if s.spectral)
    assert spectral["min_gap"] == 0 and spectral["max_cluster"] == 2


def test_eig_phase_dependence_is_caught_under_the_locator():
    torch.manual_seed(0)
    model = PhaseDependent()
    try:  # outside the locator torch itself refuses this loss
        model().backward()
        raise AssertionError("torch accepted a phase-dependent eig loss")
    except RuntimeError as err:
        assert "e^{i phi}" in str(err)
    finding = Locator(roots={"model": model}).run(model)
    assert finding is not None and finding.phase == "error" and "arbitrary phase" in finding.cause


def test_eig_cause_without_statistics():
    cause = explain(Observation("backward", "aten.div_.Tensor", node="LinalgEigBackward0"))
    assert cause.key == "eig_backward" and "non-normal" in cause.text
