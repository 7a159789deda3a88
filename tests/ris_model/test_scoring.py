"""Scoring: RMSE, CRB and error/CRB on the same matched sources; realised-SNR bins; oracle rows; the table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ris_model.metrics import MetricsError
from ris_model.music import Estimates
from ris_model.scoring import Truth, concat_truths, format_rows, rows_json, score, score_rows, truth_from
from ris_model.simulate import make_system, simulate
from ris_model.config import RunConfig

K_MAX = 3


def truth(sources: list[list[tuple[float, float, float, float, float]]]) -> Truth:
    """Scenes of (phi_deg, theta_deg, r_m, snr_db, crb_deg) sources; the CRB is the same for phi and theta,
    and crb_deg / 10 metres for r."""
    b = len(sources)
    arr = {k: np.zeros((b, K_MAX)) for k in ("phi", "theta", "r", "snr")}
    arr["r"][:] = 1.0
    crb = np.zeros((b, K_MAX, 3))
    mask = np.zeros((b, K_MAX), dtype=bool)
    arr["snr"][:] = math.nan
    for i, scene in enumerate(sources):
        for j, (p, t, r, snr, c) in enumerate(scene):
            arr["phi"][i, j], arr["theta"][i, j], arr["r"][i, j], arr["snr"][i, j] = math.radians(p), math.radians(t), r, snr
            crb[i, j] = (c, c, c / 10)
            mask[i, j] = True
    return Truth(arr["phi"], arr["theta"], arr["r"], mask, mask.sum(-1), arr["snr"], crb)


def estimates(sources: list[list[tuple[float, float, float]]]) -> Estimates:
    b = len(sources)
    phi, theta = torch.zeros(b, K_MAX, dtype=torch.float64), torch.zeros(b, K_MAX, dtype=torch.float64)
    r, mask = torch.ones(b, K_MAX, dtype=torch.float64), torch.zeros(b, K_MAX, dtype=torch.bool)
    for i, scene in enumerate(sources):
        for j, (p, t, rr) in enumerate(scene):
            phi[i, j], theta[i, j], r[i, j], mask[i, j] = math.radians(p), math.radians(t), rr, True
    return Estimates(phi, theta, r, mask, mask.sum(-1))


# Scene 0: a well-localised source (error 0.1 deg, CRB 0.05) and a missed one with a huge CRB (10 deg);
# scene 1: one source found with error 0.3 deg (CRB 0.1) plus a false alarm far away.
TRUTH = truth([[(0, 0, 2.0, 10.0, 0.05), (40, 10, 5.0, 10.0, 10.0)], [(-30, -5, 1.0, 19.0, 0.1)]])
EST = estimates([[(0.1, 0, 2.0), (-50, 20, 5.0)], [(-30.3, -5, 1.0), (50, 25, 3.0)]])


def test_rmse_and_crb_are_computed_on_the_same_matched_sources():
    row = score_rows([score("m", EST, TRUTH)], TRUTH)[-1]
    assert row["snr_bin"] == "all" and row["n_sources"] == 3 and row["n_matched"] == 2
    assert row["rmse_phi"] == pytest.approx(math.sqrt((0.1**2 + 0.3**2) / 2))
    # the missed source's CRB (10 deg) must not enter: only the two matched sources' bounds do
    assert row["crb_phi"] == pytest.approx(math.sqrt((0.05**2 + 0.1**2) / 2))
    assert row["ratio_phi_med"] == pytest.approx((0.1 / 0.05 + 0.3 / 0.1) / 2)  # median of {2, 3}
    assert row["matched_frac"] == pytest.approx(2 / 3) and row["fa_per_scene"] == pytest.approx(1.0)


def test_rows_are_binned_by_realised_snr():
    rows = score_rows([score("m", EST, TRUTH)], TRUTH)
    assert [r["snr_bin"] for r in rows] == ["10", "20", "all"]
    ten, twenty = rows[0], rows[1]
    assert (ten["n_sources"], ten["n_matched"], ten["n_scenes"]) == (2, 1, 1)
    assert (twenty["n_sources"], twenty["n_matched"], twenty["n_scenes"]) == (1, 1, 1)
    assert ten["crb_phi"] == pytest.approx(0.05) and twenty["ratio_phi_med"] == pytest.approx(3.0)


def test_oracle_rows_carry_no_crb_and_k_accuracy_only_when_estimated():
    rows = score_rows([score("oracle", EST, TRUTH, oracle=True),
                       score("est K", EST, TRUTH, k_used=torch.tensor([2, 2]))], TRUTH, binned=False)
    oracle, est_k = rows
    assert oracle["crb_phi"] is None and oracle["ratio_phi_med"] is None and oracle["rmse_phi"] > 0
    assert oracle["k_acc"] is None and est_k["k_acc"] == pytest.approx(0.5)
    text = format_rows(rows)
    assert text.splitlines()[2].split()[0] == "oracle" and " - " in text.splitlines()[2]


def test_table_formats_and_json():
    rows = score_rows([score("m", EST, TRUTH)], TRUTH)
    md = format_rows(rows, markdown=True, legend=False).splitlines()
    assert md[0].startswith("| method | SNR dB | sources | matched | FA/scene") and len(md) == 2 + len(rows)
    blob = json.loads(rows_json(rows, step=7))
    assert blob["step"] == 7 and blob["rows"][-1]["n_matched"] == 2


def test_score_rejects_estimates_of_other_scenes():
    with pytest.raises(MetricsError, match="2 true scenes"):
        score("m", estimates([[(0, 0, 1.0)]]), TRUTH)


def test_truth_from_simulation_per_source_snr_and_crb():
    cfg = RunConfig()
    system = make_system(cfg)
    d = simulate(cfg, system, "test", [0, 1])
    t = truth_from(d, system)
    m = t.mask
    # K sources share the scene's power: per-source SNRs add up to about the nominal SNR (the nominal one
    # uses the realised symbols of 16 snapshots, the per-source one their expectation)
    total = 10 * np.log10(np.nansum(10 ** (np.where(m, t.snr_db, np.nan) / 10), axis=-1))
    assert np.allclose(total, d["snr_db"].numpy(), atol=3.0)
    louder = truth_from(dict(d, noise_var=d["noise_var"] / 2), system, with_crb=False)
    assert np.allclose(louder.snr_db[m] - t.snr_db[m], 10 * math.log10(2))
    assert np.isnan(t.snr_db[~m]).all() and (t.crb[m] > 0).all()
    both = concat_truths([t, truth_from(d, system, with_crb=False)])
    assert both.n_scenes == 4 and both.crb is None
