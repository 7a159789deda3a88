"""The gap-aware decompositions as drop-ins (spectral/rule.py, eigh.py, svd.py): phase-dependent losses refused at
torch's own limit and in words that name the function, batches of matrices of any scale, observers
(TorchFunctionModes) that see each call with the user's arguments, out=, driver=, and the torch re-exports."""
from __future__ import annotations

import pytest
import torch

from ris_stability.spectral import PhaseDependenceError, eigh_gap_aware, svd_gap_aware

C128 = torch.complex128


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- phase dependence
def _phase_loss(vectors: torch.Tensor, ref: torch.Tensor, share: float) -> torch.Tensor:
    """A gauge-invariant loss plus ``share`` x 1e-2 of the phase of the first vector's first entry (its derivative
    along e^{i phi} of that vector is exactly share x 1e-2)."""
    unit = ref.conj() / ref.abs()
    return share * 1e-2 / float(ref.abs()) * (vectors[0, 0] * unit).imag + vectors[:, :2].abs().square().sum()


def _refused(decompose, a: torch.Tensor, pick, share: float) -> bool:
    ref = pick(decompose(a))[0, 0]
    x = a.clone().requires_grad_()
    try:
        _phase_loss(pick(decompose(x)), ref, share).backward()
    except RuntimeError:
        return True
    assert torch.isfinite(x.grad).all()
    return False


SVD_FACTORS = {"U": lambda out: out[0], "V": lambda out: out[2].mH}


@pytest.mark.parametrize("factor", list(SVD_FACTORS))
@pytest.mark.parametrize("share", [0.3, 0.7, 1.5])
def test_svd_refuses_phase_dependent_losses_exactly_where_torch_does(factor, share):
    """torch's svd backward refuses a phase derivative above 5e-3 (its check is on skew(U^H gU), twice it): a
    drop-in must refuse the same losses, not hand back a gradient for an ill-defined one."""
    a = torch.randn(5, 4, dtype=C128, generator=_gen(17))
    pick = SVD_FACTORS[factor]
    ours = _refused(lambda x: svd_gap_aware(x, full_matrices=False), a, pick, share)
    assert ours == _refused(lambda x: torch.linalg.svd(x, full_matrices=False), a, pick, share)
    assert ours == (share > 0.5)


@pytest.mark.parametrize("share", [0.7, 1.5])
def test_eigh_refuses_phase_dependent_losses_exactly_where_torch_does(share):
    """torch's eigh backward refuses a phase derivative above 1e-2 (Im diag V^H gV): so does the gap-aware one."""
    x = torch.randn(5, 5, dtype=C128, generator=_gen(18))
    h = x @ x.mH
    pick = lambda out: out[1]  # noqa: E731
    ours = _refused(eigh_gap_aware, h, pick, share)
    assert ours == _refused(torch.linalg.eigh, h, pick, share) == (share > 1)
