"""Inference: model -> the builder -> MUSIC with the K head; evaluation rows side by side with baselines."""

from __future__ import annotations

import torch

from ris_model.config import load_config
from ris_model.covariance import build_covariances, inference_matrix
from ris_model.data import SimDataset, train_batch
from ris_model.infer import aux_estimates, evaluate, k_from_logits, predict
from ris_model.loss import perfect_outputs
from ris_model.model import build_model
from ris_model.scoring import format_rows
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
    rows = evaluate(cfg, build_model(cfg, system), 3, system, snr_db_list=[5.0, 25.0])
    overall = {r["method"]: r for r in rows if r["snr_bin"] == "all"}
    assert list(overall) == ["learned, K head", "learned, true K", "learned aux head, K head", "MUSIC R_samp, MDL K",
                             "MUSIC R_samp, AIC K", "MUSIC R_samp, ratio K", "MUSIC R_samp, true K",
                             "MUSIC R_true, true K (oracle)"]
    oracle = overall["MUSIC R_true, true K (oracle)"]
    assert oracle["matched_frac"] == 1.0 and oracle["rmse_phi"] < 0.1 and oracle["crb_phi"] is None
    assert overall["learned, true K"]["k_acc"] is None and overall["learned, K head"]["k_acc"] is not None
    n_true = 2 * int(SimDataset(cfg, "test", size=3, system=system).batch([0, 1, 2]).k.sum())
    assert all(r["n_sources"] == n_true for r in overall.values())  # both pinned SNRs pooled
    samp = overall["MUSIC R_samp, true K"]
    assert samp["crb_phi"] > 0 and samp["ratio_phi_med"] > 0  # a CRB beside every estimator that sees noise
    assert "MUSIC R_samp, MDL K" in format_rows(rows)


def test_music_runs_are_shared_between_estimators_that_agree_on_k():
    from ris_model.infer import _JOBS, _unique_runs

    n = 4
    ks = {"head": torch.tensor([1, 2, 3, 4]), "true": torch.tensor([1, 2, 2, 5]), "MDL": torch.ones(4, dtype=torch.int64),
          "AIC": torch.ones(4, dtype=torch.int64), "ratio": torch.tensor([1, 2, 1, 1])}
    runs, rows = _unique_runs(ks, n)
    # R_eff: K head and true K agree on scenes 0 and 1 -> 6 runs; R_samp: the distinct (scene, K); R_true: n
    samp = {(i, int(k[i])) for k in (ks["MDL"], ks["ratio"], ks["true"]) for i in range(n)}
    assert len(runs) == 6 + len(samp) + n == len(set(runs))
    assert torch.equal(rows["MUSIC R_samp, MDL K"], rows["MUSIC R_samp, AIC K"])
    for name, mat, k_name, *_ in _JOBS:
        assert [runs[j] for j in rows[name].tolist()] == [(mat, i, int(ks[k_name][i])) for i in range(n)]
