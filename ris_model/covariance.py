"""THE covariance builder: factors -> R_pred -> R_blend -> R_eff (docs/physics.md section 3).

The loss, validation and inference all call ``build_covariances``; no other module forms R_blend.
Ranks: rank(R_pred) <= 2 K_MAX, rank(R_samp) <= L, so R_blend is singular for N = 144. Shrinkage makes
R_eff invertible but makes its noise eigenvalues exactly equal (a tied cluster): see docs/physics.md section 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ris_model.complex_ops import hermitise, outer, trace, trace_normalise
from ris_model.config import CovarianceConfig


@dataclass(frozen=True)
class Covariances:
    """Every matrix the builder forms, each (B, N, N) complex, Hermitian, trace 1."""

    pred: Tensor  # R_pred from the network factors
    blend: Tensor  # R_blend = (1 - beta) R_pred + beta R_samp
    eff: Tensor  # R_eff = shrinkage applied to R_blend (R_blend itself when shrinkage = 0)

    def select(self, which: Literal["pred", "blend", "eff"]) -> Tensor:
        return {"pred": self.pred, "blend": self.blend, "eff": self.eff}[which]


def shrink(R: Tensor, alpha: float) -> Tensor:
    """(1 - alpha) R + alpha (tr R / N) I."""
    if alpha == 0:
        return R
    n = R.shape[-1]
    eye = torch.eye(n, dtype=R.dtype, device=R.device)
    return (1 - alpha) * R + (alpha * trace(R) / n)[..., None, None].to(R.dtype) * eye


def build_covariances(fact_angle: Tensor, fact_range: Tensor, R_samp: Tensor, cfg: CovarianceConfig) -> Covariances:
    """The one builder. fact_* (B, N, K_MAX) complex factors; R_samp (B, N, N) trace 1."""
    if fact_angle.shape != fact_range.shape or fact_angle.shape[:2] != R_samp.shape[:2]:
        raise ValueError(f"covariance builder: shapes do not match: cov_fact_angle {tuple(fact_angle.shape)}, "
                         f"cov_fact_range {tuple(fact_range.shape)}, R_samp {tuple(R_samp.shape)}; expected "
                         "(B, N, K_MAX), (B, N, K_MAX), (B, N, N)")
    r_samp = R_samp.to(fact_angle.dtype)
    pred = trace_normalise(hermitise(outer(fact_angle) + cfg.lambda_range * outer(fact_range)), "R_pred")
    blend = trace_normalise(hermitise((1 - cfg.beta) * pred + cfg.beta * r_samp), "R_blend")
    return Covariances(pred=pred, blend=blend, eff=shrink(blend, cfg.shrinkage))


def inference_matrix(cov: Covariances) -> Tensor:
    """The matrix MUSIC runs on at inference: R_eff (R_blend when no shrinkage is configured)."""
    return cov.eff
