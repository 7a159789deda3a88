"""Inference: model -> THE covariance builder -> MUSIC with K from the K head -> sources; evaluation.

``evaluate`` puts the learned pipeline side by side with MUSIC on R_samp (K from MDL, AIC, the
eigenvalue ratio or the truth) and on R_true, against each source's Cramer-Rao bound, on the same test
scenes; rows come from ``scoring`` (the one table). All MUSIC runs on a batch share one ``music`` call,
so the steering grid is computed once for every covariance.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ris_model.config import RunConfig
from ris_model.covariance import Covariances, build_covariances, inference_matrix
from ris_model.data import Batch, SimDataset
from ris_model.model import ModelOutputs
from ris_model.model_order import estimate_k_ic
from ris_model.music import Estimates, estimate_k, music, signal_subspace
from ris_model.scoring import concat_truths, score, score_rows, truth_from
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


def _cat(parts: list[Estimates]) -> Estimates:
    return Estimates(*(torch.cat([getattr(p, f) for p in parts]) for f in ("phi", "theta", "r", "mask", "k")))


def test_batches(cfg: RunConfig, n: int, system: System, snr_db_list: list[float] | None = None) -> list[Batch]:
    """Test samples 0..n-1 as drawn (None), or the same scenes with the nominal SNR pinned to each value
    (the SNR is the last draw of a scene, so only the noise level changes)."""
    if snr_db_list is None:
        return [SimDataset(cfg, "test", size=n, system=system).batch(list(range(n)))]
    out = []
    for snr in snr_db_list:
        c = dataclasses.replace(cfg, scene=dataclasses.replace(cfg.scene, snr_db=(float(snr), float(snr))))
        out.append(SimDataset(c, "test", size=n, system=system).batch(list(range(n))))
    return out


def k_estimates(cfg: RunConfig, R_samp: Tensor) -> dict[str, Tensor]:
    """The classical K estimates on R_samp, the matrix the baseline MUSIC runs on: MDL and AIC on its top
    rank(R_samp) <= L eigenvalues (``model_order``), and the eigenvalue-ratio rule (``music.estimate_k``)."""
    evals = signal_subspace(R_samp, cfg.scene.k_max)[0]
    rank = min(cfg.channel.snapshots, evals.shape[-1])
    ic = {kind: estimate_k_ic(evals, cfg.channel.snapshots, rank, cfg.scene.k_max, kind) for kind in ("mdl", "aic")}
    return {"MDL": ic["mdl"], "AIC": ic["aic"], "ratio": estimate_k(evals, cfg.scene.k_max)}


# (method, matrix, K used, K estimated (scored for K accuracy), oracle)
_JOBS = [("learned, K head", "eff", "head", True, False), ("learned, true K", "eff", "true", False, False),
         ("MUSIC R_samp, MDL K", "samp", "MDL", True, False), ("MUSIC R_samp, AIC K", "samp", "AIC", True, False),
         ("MUSIC R_samp, ratio K", "samp", "ratio", True, False), ("MUSIC R_samp, true K", "samp", "true", False, False),
         ("MUSIC R_true, true K (oracle)", "true", "true", False, True)]
AUX_METHOD = "learned aux head, K head"


def _unique_runs(ks: dict[str, Tensor], n: int) -> tuple[list[tuple[str, int, int]], dict[str, Tensor]]:
    """MUSIC runs needed by the jobs: unique (matrix, scene, K) triples, and each job's row per scene.
    Estimators often agree on K (MDL and AIC here always do), and MUSIC is deterministic, so a
    (matrix, scene, K) triple is localised once and shared."""
    runs: dict[tuple[str, int, int], int] = {}
    rows = {}
    for name, mat, k_name, *_ in _JOBS:
        idx = [runs.setdefault((mat, i, int(ks[k_name][i])), len(runs)) for i in range(n)]
        rows[name] = torch.tensor(idx)
    return list(runs), rows


def _take(est: Estimates, idx: Tensor) -> Estimates:
    return Estimates(*(getattr(est, f)[idx] for f in ("phi", "theta", "r", "mask", "k")))


def _localise(cfg: RunConfig, model: torch.nn.Module, batch: Batch, system: System) -> dict[str, tuple]:
    """Estimates and the K used of every method on one batch (one shared MUSIC call over unique runs)."""
    device = next(model.parameters()).device
    outputs, cov = model_covariances(cfg, model, batch.to(device))
    ks = {"head": k_from_logits(outputs.k_logits).cpu(), "true": batch.k, **k_estimates(cfg, batch.R_samp)}
    mats = {"eff": inference_matrix(cov).cpu(), "samp": batch.R_samp, "true": batch.R_true}
    runs, rows = _unique_runs(ks, batch.size)
    t0 = time.perf_counter()
    est = music(torch.stack([mats[m][i].to(torch.complex128) for m, i, _ in runs]),
                torch.tensor([k for *_, k in runs]), system, cfg.scene, cfg.music)
    logger.info("evaluate: MUSIC on %d covariances (%d jobs x %d scenes deduplicated) in %.1f s", len(runs),
                len(_JOBS), batch.size, time.perf_counter() - t0)
    out = {name: (_take(est, rows[name]), ks[k]) for name, _, k, *_ in _JOBS}
    out[AUX_METHOD] = (aux_estimates(outputs, ks["head"]), ks["head"])
    return out


@torch.no_grad()
def evaluate(cfg: RunConfig, model: torch.nn.Module, n: int, system: System | None = None,
             with_crb: bool = True, snr_db_list: list[float] | None = None) -> list[dict]:
    """``scoring`` rows on test samples 0..n-1 (at each pinned nominal SNR of ``snr_db_list``, pooled):
    the learned pipeline (MUSIC on R_eff with the K head and with the true K; the aux head), MUSIC on
    R_samp with K from MDL, AIC, the eigenvalue ratio and the truth, and the oracle MUSIC on R_true.
    Rows are binned by per-source realised SNR; ``with_crb=False`` leaves the CRB columns empty."""
    system = system if system is not None else make_system(cfg)
    batches = test_batches(cfg, n, system, snr_db_list)
    per_batch = [_localise(cfg, model, b, system) for b in batches]
    truth = concat_truths([truth_from(b, system, with_crb=with_crb) for b in batches])
    order = [_JOBS[0][0], _JOBS[1][0], AUX_METHOD] + [j[0] for j in _JOBS[2:]]
    scored_k = {j[0]: j[3] for j in _JOBS} | {AUX_METHOD: True}
    oracle = {j[0]: j[4] for j in _JOBS} | {AUX_METHOD: False}
    scores = []
    for name in order:
        est = _cat([pb[name][0] for pb in per_batch])
        k_used = torch.cat([pb[name][1] for pb in per_batch]) if scored_k[name] else None
        scores.append(score(name, est, truth, k_used, oracle=oracle[name]))
    return score_rows(scores, truth)

