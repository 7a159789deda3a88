"""MDL / AIC model order on the range of a rank-deficient covariance."""

from __future__ import annotations

import pytest
import torch

from ris_model.model_order import ModelOrderError, estimate_k_ic, information_criteria


def sample_covariance_eigs(k: int, n_snap: int, p: int, n_total: int, seed: int, snr: float = 100.0) -> torch.Tensor:
    """Ascending eigenvalues (1, n_total) of a p-dim sample covariance (k strong sources + white noise from
    n_snap snapshots) embedded in n_total dimensions (the trailing n_total - p eigenvalues are exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, k, dtype=torch.complex128, generator=g)
    s = torch.randn(k, n_snap, dtype=torch.complex128, generator=g) * snr**0.5
    x = a @ s + torch.randn(p, n_snap, dtype=torch.complex128, generator=g)
    lam = torch.linalg.eigvalsh(x @ x.mH / n_snap)
    return torch.cat([torch.zeros(n_total - p, dtype=torch.float64), lam])[None]


@pytest.mark.parametrize("kind", ["mdl", "aic"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_finds_k_on_the_range_of_a_rank_deficient_matrix(kind, k):
    """p = 16 non-zero eigenvalues in N = 144 (like R_samp), many snapshots: the criterion on the range is
    right, while the trailing zeros would make a geometric mean over all N eigenvalues zero."""
    lam = sample_covariance_eigs(k, n_snap=400, p=16, n_total=144, seed=k)
    assert int(estimate_k_ic(lam, 400, 16, 5, kind)) == k


def test_mdl_penalises_more_than_aic():
    lam = sample_covariance_eigs(2, n_snap=400, p=16, n_total=16, seed=0)
    ic = information_criteria(lam, 400, 16, 5)
    assert (ic["mdl"].diff(dim=-1)[0, 2:] > ic["aic"].diff(dim=-1)[0, 2:] / 2).all()  # ln(400)/2 > 2 per free parameter


@pytest.mark.parametrize("args, match", [
    ((16, 16, 16), "k_max"),        # k_max must be < rank
    ((16, 200, 5), "rank"),         # rank cannot exceed N
    ((0, 16, 5), "n_snapshots"),
], ids=["k_max-not-below-rank", "rank-above-N", "no-snapshots"])
def test_bad_arguments(args, match):
    lam = sample_covariance_eigs(1, 50, 16, 144, 0)
    with pytest.raises(ModelOrderError, match=match):
        information_criteria(lam, *args)


def test_unknown_criterion():
    with pytest.raises(ModelOrderError, match="valid: mdl, aic"):
        estimate_k_ic(sample_covariance_eigs(1, 50, 16, 144, 0), 50, 16, 5, "bic")
