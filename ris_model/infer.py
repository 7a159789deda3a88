"""Inference: model -> THE covariance builder -> MUSIC with K from the K head -> sources; evaluation.

``evaluate`` puts the learned pipeline side by side with MUSIC on R_samp and on R_true and with the
Cramer-Rao bound, on the same test scenes. All MUSIC runs share one ``music`` call, so the steering
grid is computed once for every covariance.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ris_model.config import RunConfig
from ris_model.covariance import Covariances, build_covariances, inference_matrix
from ris_model.crb import crb_batch, rms_bound
from ris_model.data import Batch, SimDataset
from ris_model.metrics import localization_errors
from ris_model.model import ModelOutputs
from ris_model.music import Estimates, estimate_k, music, signal_subspace
from ris_model.simulate import System, make_system

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    outputs: ModelOutputs
    cov: Covariances
    R: Tensor  # (B, N, N) the matrix MUSIC ran on (R_eff: R_blend, shrunk if configured)
    k_hat: Tensor  # (B,) from the K head
    sources: Estimates  # MUSIC on R with k_hat


def k_from_logits(k_logits: Tensor) -> Tensor:
    return k_logits.argmax(-1) + 1


def aux_estimates(outputs: ModelOutputs, k: Tensor) -> Estimates:
    """The aux head's positions of slots 0..k-1 as Estimates (the loss's slot convention)."""
    aux = outputs.aux.detach().to("cpu", torch.float64)
    mask = torch.arange(aux.shape[1])[None, :] < k.cpu()[:, None]
    r = torch.where(mask, aux[..., 2], torch.ones_like(aux[..., 2]))
    return Estimates(phi=aux[..., 0], theta=aux[..., 1], r=r, mask=mask, k=mask.sum(-1))


@torch.no_grad()
def model_covariances(cfg: RunConfig, model: torch.nn.Module, batch: Batch) -> tuple[ModelOutputs, Covariances]:
    was_training = model.training
    model.eval()
    outputs = model(batch)
    model.train(was_training)
    f_ang, f_rng = outputs.cov_fact_angle, outputs.cov_fact_range
    return outputs, build_covariances(f_ang, f_rng, batch.R_samp.to(f_ang.dtype), cfg.covariance)


@torch.no_grad()
def predict(cfg: RunConfig, model: torch.nn.Module, batch: Batch, system: System) -> Prediction:
    """Sources of every sample of ``batch``: MUSIC on the inference matrix with K from the K head."""
    outputs, cov = model_covariances(cfg, model, batch)
    R = inference_matrix(cov)
    k_hat = k_from_logits(outputs.k_logits).cpu()
    est = music(R.cpu(), k_hat, system, cfg.scene, cfg.music)
    return Prediction(outputs=outputs, cov=cov, R=R, k_hat=k_hat, sources=est)


def _split(est: Estimates, i: int, n: int) -> Estimates:
    return Estimates(*(t[i * n:(i + 1) * n] for t in (est.phi, est.theta, est.r, est.mask, est.k)))


def _row(name: str, est: Estimates, batch: Batch, k_used: Tensor) -> dict:
    m = localization_errors(est, batch.phi, batch.theta, batch.r, batch.mask)
    return {"method": name, **m, "matched_frac": m["n_matched"] / max(m["n_true"], 1),
            "k_acc": float((k_used.cpu() == batch.k.cpu()).double().mean())}


@torch.no_grad()
def evaluate(cfg: RunConfig, model: torch.nn.Module, n: int, system: System | None = None,
             with_crb: bool = True) -> list[dict]:
    """Metrics on test samples 0..n-1: the learned pipeline (MUSIC on R_eff with the K head and with the
    true K, and the aux head), MUSIC on R_samp (true K and estimate_k), MUSIC on R_true, and the CRB.

    Each row holds ``metrics.localization_errors`` keys plus matched_frac and k_acc.
    """
    system = system if system is not None else make_system(cfg)
    device = next(model.parameters()).device
    batch = SimDataset(cfg, "test", size=n, system=system).batch(list(range(n)))
    outputs, cov = model_covariances(cfg, model, batch.to(device))
    k_hat, k_true = k_from_logits(outputs.k_logits).cpu(), batch.k
    k_samp = estimate_k(signal_subspace(batch.R_samp, cfg.scene.k_max)[0], cfg.scene.k_max)
    R_eff = inference_matrix(cov).cpu().to(torch.complex128)
    jobs = [("learned R_eff, K head", R_eff, k_hat), ("learned R_eff, true K", R_eff, k_true),
            ("R_samp, true K", batch.R_samp, k_true), ("R_samp, estimate_k", batch.R_samp, k_samp),
            ("R_true, true K", batch.R_true, k_true)]
    t0 = time.perf_counter()
    est = music(torch.cat([R.to(torch.complex128) for _, R, _ in jobs]), torch.cat([k for *_, k in jobs]),
                system, cfg.scene, cfg.music)
    logger.info("evaluate: MUSIC on %d covariances in %.1f s", len(jobs) * n, time.perf_counter() - t0)
    rows = [_row(name, _split(est, i, n), batch, k) for i, (name, _, k) in enumerate(jobs)]
    rows.insert(2, _row("learned aux head, K head", aux_estimates(outputs, k_hat), batch, k_hat))
    if with_crb:
        bound = crb_batch(batch.to(dtype=torch.float64), system)
        rows.append({"method": "CRB", "rmse_phi_deg": rms_bound(bound["phi_deg"], batch.mask),
                     "rmse_theta_deg": rms_bound(bound["theta_deg"], batch.mask),
                     "rmse_r_m": rms_bound(bound["r_m"], batch.mask)})
    return rows


_COLUMNS = [("rmse phi", "rmse_phi_deg", "{:8.3f}"), ("rmse th", "rmse_theta_deg", "{:8.3f}"),
            ("rmse r", "rmse_r_m", "{:7.3f}"), ("matched", "matched_frac", "{:7.3f}"),
            ("success", "success_rate", "{:7.3f}"), ("FA", "false_alarms", "{:5d}"), ("K acc", "k_acc", "{:6.3f}")]


def format_eval(rows: list[dict]) -> str:
    """Plain-text table of ``evaluate`` rows (degrees, metres; matched = sources found within the gate)."""
    width = max(len(r["method"]) for r in rows)
    head = f"{'method':<{width}} " + " ".join(f"{h:>{len(fmt.format(0))}}" for h, _, fmt in _COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [fmt.format(r[k]) if k in r else " " * len(fmt.format(0)) for _, k, fmt in _COLUMNS]
        lines.append(f"{r['method']:<{width}} " + " ".join(cells))
    n = rows[0].get("n_scenes", 0)
    lines.append(f"{n} test scenes, {rows[0].get('n_true', 0)} sources; RMSE over sources matched within the "
                 "5 deg gate; CRB = sqrt(mean CRB variance) at the same scenes")
    return "\n".join(lines)
