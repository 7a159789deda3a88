"""Inference: model -> the builder -> MUSIC with the K head; evaluation rows side by side with baselines."""

from __future__ import annotations

import math

import torch

from ris_model.config import load_config
from ris_model.covariance import build_covariances, inference_matrix
from ris_model.data import train_batch
from ris_model.infer import aux_estimates, evaluate, format_eval, k_from_logits, predict
from ris_model.loss import perfect_outputs
from ris_model.model import build_model
from ris_model.simulate import make_system

TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "model.factor_hidden=32",
        "model.code_dim=8", "model.beam_grid=[4,2,2]", "model.readout_grid=[8,4,2]", "data.batch_size=3",
        # a coarse MUSIC grid keeps the test fast; refinement still converges on the peaks
        "music.phi_step_deg=2.0", "music.theta_step_deg=2.0", "music.n_range=8", "music.refine_iters=20",
        "covariance.shrinkage=0.01"]




def test_predict_uses_the_builder_and_the_k_head():
    cfg = load_config(None, TINY)
    system = make_system(cfg)
    model = build_model(cfg, system)
    batch = train_batch(cfg, system, 0)
    pred = predict(cfg, model, batch, system)
    out = model(batch)
    cov = build_covariances(out.cov_fact_angle, out.cov_fact_range, batch.R_samp, cfg.covariance)
    assert torch.allclose(pred.R, inference_matrix(cov)) and torch.equal(pred.R, pred.cov.eff)
    assert torch.equal(pred.k_hat, k_from_logits(out.k_logits))
    assert torch.equal(pred.sources.k, pred.k_hat) and model.training  # predict restores the mode


def test_aux_estimates_take_the_first_k_slots():
    cfg = load_config(None, TINY)
    system = make_system(cfg)
    batch = train_batch(cfg, system, 1)
    est = aux_estimates(perfect_outputs(batch, system, cfg.scene.k_max), batch.k)
    assert torch.equal(est.mask, batch.mask) and torch.allclose(est.phi[est.mask], batch.phi[batch.mask].double())


def test_evaluate_rows_side_by_side():
    cfg = load_config(None, TINY)
    system = make_system(cfg)
    rows = evaluate(cfg, build_model(cfg, system), 3, system)
    names = [r["method"] for r in rows]
    assert names == ["learned R_eff, K head", "learned R_eff, true K", "learned aux head, K head", "R_samp, true K",
                     "R_samp, estimate_k", "R_true, true K", "CRB"]
    true_row = rows[names.index("R_true, true K")]
    assert true_row["matched_frac"] == 1.0 and true_row["rmse_phi_deg"] < 0.1  # the oracle sits on the sources
    assert rows[names.index("learned R_eff, true K")]["k_acc"] == 1.0
    crb = rows[-1]
    assert all(math.isfinite(crb[k]) and crb[k] > 0 for k in ("rmse_phi_deg", "rmse_theta_deg", "rmse_r_m"))
    table = format_eval(rows)
    assert "R_samp, true K" in table and "CRB" in table and "3 test scenes" in table
