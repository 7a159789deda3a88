"""The composite loss: one small named nn.Module per term, weights from ``cfg.loss``.

Module attribute names equal the term names (``loss.cov_nmse``, ``loss.subspace``, ...) so a module
tracker reports where an op ran. Every term returns the batch mean of a per-sample value, unweighted;
``CompositeLoss`` returns ``(total, {name: value})`` with total = sum_t w_t * value_t. A term whose weight
is 0 is still evaluated and reported, but under ``torch.no_grad()``: even a zero cotangent through an
eigenvector backward with tied eigenvalues would turn the gradient into NaN (0/0).

R_x (the matrix the covariance terms see) is ``cov.pred`` when ``loss.covariance == "pred"``, otherwise
``cov.eff``: the matrix inference runs MUSIC on (R_blend, shrunk when ``covariance.shrinkage > 0``).

Slot convention (used by orthogonality, cross and aux): a sample with K sources uses slots 0..K-1 of
every head; inside those slots the sources are matched by the Hungarian algorithm on the aux distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ris_model.config import RunConfig
from ris_model.covariance import Covariances, build_covariances
from ris_model.model import ModelOutputs
from ris_model.simulate import System, make_system
from ris_stability.spectral import eigh_gap_aware

TERMS: tuple[str, ...] = ("cov_nmse", "eigengap", "subspace", "orthogonality", "cross", "k_ce", "aux")
# loss.eigh_backward: the eigh the eigenvector terms call (forwards identical; only the backward differs).
EIGH_BACKWARDS: tuple[str, ...] = ("torch", "gap_aware")
MIN_HALF_RANGE = 1e-3  # aux normalisation floor (radians / log-metres) for a degenerate scene interval


@dataclass(frozen=True)
class LossInputs:
    """Everything the terms read, formed once per call."""

    outputs: ModelOutputs
    cov: Covariances
    R_x: Tensor  # (B, N, N) the matrix the covariance terms use
    R_true: Tensor  # (B, N, N)
    basis: Tensor  # (B, N, K_MAX) orthonormal basis of span{a_k}, zero columns beyond K
    k: Tensor  # (B,) int64, true K
    mask: Tensor  # (B, K_MAX) bool, slot j < K
    target: Tensor  # (B, K_MAX, 3) true (phi, theta, r); padding beyond K


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per-sample mean of x (B, K) over mask (B, K), then batch mean."""
    m = mask.to(x.dtype)
    return ((x * m).sum(-1) / m.sum(-1).clamp_min(1)).mean()


class CovNMSE(nn.Module):
    """||R_x - R_true||_F^2 / ||R_true||_F^2."""

    def forward(self, inp: LossInputs) -> Tensor:
        err = (inp.R_x - inp.R_true).abs().pow(2).sum((-2, -1))
        return (err / inp.R_true.abs().pow(2).sum((-2, -1))).mean()


class EigenGap(nn.Module):
    """relu(margin - (lambda_K - lambda_{K+1})), eigenvalues of R_x descending, true K per sample.

    Eigenvalues only (eigvalsh): its backward is finite for any spectrum, ties included.
    """

    def __init__(self, margin: float):
        super().__init__()
        self.margin = margin

    def forward(self, inp: LossInputs) -> Tensor:
        lam = torch.linalg.eigvalsh(inp.R_x).flip(-1)  # descending
        idx = (inp.k - 1)[:, None]
        gap = lam.gather(-1, idx) - lam.gather(-1, idx + 1)
        return torch.relu(self.margin - gap[:, 0]).mean()


class Subspace(nn.Module):
    """1 - (1/K) sum_{j<K} ||Q^H u_j||^2: top-K EIGENVECTORS u_j of R_x against span{a_k} (basis Q).

    Phase-invariant (|.|^2 of projections), so its eigenvector gradient is well defined; it goes through
    the eigh backward selected by ``loss.eigh_backward``, which is the point of the term.
    """

    def __init__(self, backward: str, k_max: int):
        super().__init__()
        if backward not in EIGH_BACKWARDS:
            raise ValueError(f"loss.eigh_backward: unknown backward {backward!r}; valid choices: "
                             f"{', '.join(EIGH_BACKWARDS)}. Next step: fix loss.eigh_backward in the config.")
        self.backward, self.k_max = backward, k_max

    def forward(self, inp: LossInputs) -> Tensor:
        # torch.linalg.eigh looked up per call, so a surrounding ris_stability.gap_aware() context applies.
        _, vecs = (eigh_gap_aware if self.backward == "gap_aware" else torch.linalg.eigh)(inp.R_x)
        top = vecs[..., -self.k_max:].flip(-1)  # (B, N, K_MAX), descending eigenvalue order
        energy = (inp.basis.mH @ top).abs().pow(2).sum(-2)  # (B, K_MAX): ||Q^H u_j||^2
        return 1 - _masked_mean(energy, inp.mask)


def _unit_columns(f: Tensor) -> Tensor:
    norm = f.abs().pow(2).sum(-2, keepdim=True).sqrt()
    # A zero column stays zero (0 / tiny); a positive norm divides exactly.
    return f / norm.clamp_min(torch.finfo(norm.dtype).tiny)


class Orthogonality(nn.Module):
    """Mean |<f_i, f_j>|^2 over pairs i != j < K of the unit-normalised angle-factor columns."""

    def forward(self, inp: LossInputs) -> Tensor:
        f = _unit_columns(inp.outputs.cov_fact_angle)
        gram = (f.mH @ f).abs().pow(2)  # (B, K_MAX, K_MAX)
        m = inp.mask.to(gram.dtype)
        pairs = m[:, :, None] * m[:, None, :] * (1 - torch.eye(m.shape[-1], dtype=gram.dtype, device=gram.device))
        k = inp.k.to(gram.dtype)
        return ((gram * pairs).sum((-2, -1)) / (k * (k - 1)).clamp_min(1)).mean()


class Cross(nn.Module):
    """Angle/range consistency: 1 - |<f_ang_k, f_rng_k>|^2 / (||f_ang_k||^2 ||f_rng_k||^2) over slots k < K.

    Both factors of a slot describe the same source (the range factor is the angle factor at another
    range hypothesis); the term bounds how far the two may drift apart. Zero for a perfect prediction.
    """

    def forward(self, inp: LossInputs) -> Tensor:
        fa, fr = _unit_columns(inp.outputs.cov_fact_angle), _unit_columns(inp.outputs.cov_fact_range)
        coh = (fa.conj() * fr).sum(-2).abs().pow(2)  # (B, K_MAX)
        return _masked_mean(1 - coh, inp.mask)


class KCrossEntropy(nn.Module):
    """Cross-entropy of the K head (logit j is K = j + 1)."""

    def forward(self, inp: LossInputs) -> Tensor:
        return nn.functional.cross_entropy(inp.outputs.k_logits, inp.k - 1)


def _wrap(d: Tensor) -> Tensor:
    return torch.atan2(torch.sin(d), torch.cos(d))


class AuxRegression(nn.Module):
    """Wrapped Huber on phi, theta and Huber on log r, Hungarian-matched within slots 0..K-1.

    Each coordinate is divided by the half-width of its scene interval, so the three weigh alike.
    """

    def __init__(self, cfg: RunConfig):
        super().__init__()
        sc = cfg.scene
        half = [math.radians(sc.phi_deg[1] - sc.phi_deg[0]) / 2, math.radians(sc.theta_deg[1] - sc.theta_deg[0]) / 2,
                math.log(sc.range_m[1] / sc.range_m[0]) / 2]
        # A degenerate interval (e.g. theta pinned to one value) still needs a finite scale.
        self.register_buffer("scale", torch.tensor([max(h, MIN_HALF_RANGE) for h in half]), persistent=False)
        self.delta = cfg.loss.aux_huber_delta

    def residuals(self, aux: Tensor, target: Tensor) -> Tensor:
        """(..., 3) normalised residuals (wrapped angles, log range)."""
        d_ang = _wrap(aux[..., :2] - target[..., :2])
        d_r = torch.log(aux[..., 2:]) - torch.log(target[..., 2:])
        return torch.cat([d_ang, d_r], dim=-1) / self.scale.to(aux.dtype)

    def match(self, aux: Tensor, target: Tensor, k: Tensor) -> Tensor:
        """perm (B, K_MAX): slot i < K is matched to source perm[b, i]; identity beyond K."""
        with torch.no_grad():
            cost = self.residuals(aux[:, :, None, :], target[:, None, :, :]).abs().sum(-1).cpu().numpy()
        perm = np.tile(np.arange(aux.shape[1]), (aux.shape[0], 1))
        for b, kb in enumerate(k.tolist()):
            rows, cols = linear_sum_assignment(cost[b, :kb, :kb])
            perm[b, rows] = cols
        return torch.from_numpy(perm).to(aux.device)

    def forward(self, inp: LossInputs) -> Tensor:
        aux = inp.outputs.aux
        perm = self.match(aux, inp.target, inp.k)
        tgt = inp.target.gather(1, perm[..., None].expand(-1, -1, 3))
        res = self.residuals(aux, tgt)
        hub = nn.functional.huber_loss(res, torch.zeros_like(res), delta=self.delta, reduction="none") / self.delta
        return _masked_mean(hub.sum(-1), inp.mask)


class CompositeLoss(nn.Module):
    """All terms of docs/physics.md section 3; forward(outputs, batch) -> (total, {term: value})."""

    def __init__(self, cfg: RunConfig, system: System):
        super().__init__()
        lc = cfg.loss
        self.cfg, self.system = cfg, system
        self.cov_nmse = CovNMSE()
        self.eigengap = EigenGap(lc.eigengap_margin)
        self.subspace = Subspace(lc.eigh_backward, cfg.scene.k_max)
        self.orthogonality = Orthogonality()
        self.cross = Cross()
        self.k_ce = KCrossEntropy()
        self.aux = AuxRegression(cfg)
        self.weights = {name: getattr(lc, f"w_{name}") for name in TERMS}

    def inputs(self, outputs: ModelOutputs, batch) -> LossInputs:
        """Run THE builder on the outputs and gather the targets (public for alignment tools)."""
        dtype = outputs.cov_fact_angle.dtype
        cov = build_covariances(outputs.cov_fact_angle, outputs.cov_fact_range, batch.R_samp.to(dtype),
                                self.cfg.covariance)
        r_x = cov.pred if self.cfg.loss.covariance == "pred" else cov.eff
        with torch.no_grad():
            a = self.system.steer(batch.phi.double(), batch.theta.double(), batch.r.double())  # (B, K_MAX, N)
            basis, _ = torch.linalg.qr(a.transpose(-1, -2) * batch.mask[:, None, :])
            basis = (basis * batch.mask[:, None, :]).to(dtype)  # QR of a masked matrix: keep the first K columns
        target = torch.stack([batch.phi, batch.theta, batch.r], dim=-1).to(outputs.aux.dtype)
        return LossInputs(outputs=outputs, cov=cov, R_x=r_x, R_true=batch.R_true.to(dtype), basis=basis,
                          k=batch.k, mask=batch.mask, target=target)

    def forward(self, outputs: ModelOutputs, batch) -> tuple[Tensor, dict[str, Tensor]]:
        inp = self.inputs(outputs, batch)
        terms: dict[str, Tensor] = {}
        total = outputs.k_logits.new_zeros(())
        for name in TERMS:
            w = self.weights[name]
            if w == 0:
                with torch.no_grad():
                    terms[name] = getattr(self, name)(inp)
                continue
            terms[name] = getattr(self, name)(inp)
            total = total + w * terms[name]
        return total, terms


def perfect_outputs(batch, system: System, k_max: int) -> ModelOutputs:
    """The outputs of an ideal network on ``batch``: both factors sqrt(p_k) a_k (so R_pred = R_true),
    K head certain of the true K, aux = the true positions."""
    dtype = batch.phi.dtype
    a = system.steer(batch.phi.double(), batch.theta.double(), batch.r.double())  # (B, K_MAX, N)
    f = (a * (batch.powers * batch.mask).double().sqrt()[..., None]).transpose(-1, -2)
    f = f.to(batch.R_samp.dtype)
    logits = torch.full((batch.size, k_max), -30.0, dtype=dtype)
    logits[torch.arange(batch.size), batch.k - 1] = 30.0
    aux = torch.stack([batch.phi, batch.theta, batch.r], dim=-1)
    return ModelOutputs(cov_fact_angle=f, cov_fact_range=f.clone(), k_logits=logits, aux=aux)


@torch.no_grad()
def loss_floors(cfg: RunConfig, n: int = 64, system: System | None = None) -> dict[str, float]:
    """Each term (unweighted) and the weighted total for a perfect prediction on validation samples
    0..n-1: what no network can go below with this config (e.g. cov_nmse > 0 when R_x blends in R_samp)."""
    from ris_model.data import SimDataset

    system = system if system is not None else make_system(cfg)
    batch = SimDataset(cfg, "val", size=n, system=system).batch(list(range(n)))
    loss_fn = CompositeLoss(cfg, system)
    total, terms = loss_fn(perfect_outputs(batch, system, cfg.scene.k_max), batch)
    return {**{k: float(v) for k, v in terms.items()}, "total": float(total)}


def format_floors(floors: dict[str, float], cfg: RunConfig) -> str:
    lines = [f"loss floors of {cfg.name!r} (R_x = {'R_pred' if cfg.loss.covariance == 'pred' else 'R_eff'}, "
             f"perfect prediction R_pred = R_true):"]
    for name in TERMS:
        lines.append(f"  {name:<14} {floors[name]:.6g}   (weight {getattr(cfg.loss, 'w_' + name):g})")
    lines.append(f"  {'total':<14} {floors['total']:.6g}")
    return "\n".join(lines)
