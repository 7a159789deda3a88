"""`risdiag align` over every shipped config: all aligned except seed-misaligned.toml, whose misalignment
(the loss terms consume R_pred, MUSIC consumes R_blend) must be detected, so this check can fail.

Speed: untrained weights, one batch of 2 validation samples, no training step, and a coarse MUSIC grid
(``SPEED``): which matrix each path consumes does not depend on the grid resolution or the model size.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from ris_model.config import CovarianceConfig, load_config
from ris_model.covariance import build_covariances
from ris_stability.integrations.ris_align import (
    ALIGN_EXIT_ALIGNED, ALIGN_EXIT_MISALIGNED, _validation_problems, align_config, run_align,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

CONFIGS = sorted(p for p in Path(__file__).resolve().parents[2].joinpath("configs").glob("*.toml")
                 if not p.name.startswith("space-"))  # space-*.toml are sweep search spaces
MISALIGNED = {"seed-misaligned.toml"}
SHIPPED = {"quickstart.toml", "default.toml", "seed-misaligned.toml", "seed-nan.toml"}
SPEED = ["music.phi_step_deg=6.0", "music.theta_step_deg=6.0", "music.n_range=3", "music.refine_iters=2"]
COVARIANCE_TERMS = {"loss.cov_nmse", "loss.eigengap", "loss.subspace"}


def test_the_shipped_configs_are_all_checked():
    assert SHIPPED <= {p.name for p in CONFIGS}


def _term(row) -> str:
    return row.consumer.split(" ")[0]  # "loss.subspace (w=0)" -> "loss.subspace"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_alignment(path):
    result = align_config(load_config(path, SPEED), batch_size=2)
    cov_rows = [row for row in result.rows if _term(row) in COVARIANCE_TERMS]
    assert {(row.phase, _term(row)) for row in cov_rows} == {(p, t) for p in ("train", "val") for t in COVARIANCE_TERMS}
    assert all(row.inference_consumes in ("R_blend = R_eff", "R_eff") for row in cov_rows)
    if path.name in MISALIGNED:
        assert not result.aligned
        assert all(not row.aligned and row.consumes == "R_pred" and row.rel_diff > 1e-2 for row in cov_rows)
        assert all(row.aligned for row in result.rows if row not in cov_rows)  # only the loss side is wrong
    else:
        assert result.aligned, result.format_table()
        assert all(row.consumes == row.inference_consumes and row.rel_diff <= row.rtol for row in cov_rows)


def test_run_align_exit_codes_and_table():
    code, text = run_align(str(CONFIG_DIR / "seed-misaligned.toml"), SPEED, as_json=False)
    assert code == ALIGN_EXIT_MISALIGNED == 1
    for word in ("MISALIGNED", "loss.cov_nmse", "loss.subspace", "R_pred", "R_blend", "verdict: MISALIGNED"):
        assert word in text
    code, text = run_align(str(CONFIG_DIR / "quickstart.toml"), SPEED, as_json=True)
    assert code == ALIGN_EXIT_ALIGNED == 0
    doc = json.loads(text)
    assert doc["aligned"] is True and doc["config"] == str(CONFIG_DIR / "quickstart.toml") and doc["rows"]


def test_override_can_fix_the_misaligned_config():
    code, _ = run_align(str(CONFIG_DIR / "seed-misaligned.toml"), SPEED + ["loss.covariance=blend"], as_json=False)
    assert code == ALIGN_EXIT_ALIGNED


def test_validation_built_with_other_settings_is_a_problem():
    """The validation check compares validation's builder outputs with inference's on the same batch."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 24, 5, dtype=torch.complex128, generator=g)
    s = torch.randn(2, 24, 16, dtype=torch.complex128, generator=g)
    r_samp = s @ s.mH / (s.abs() ** 2).sum((-2, -1))[:, None, None]
    cfg = load_config(None)
    infer = types.SimpleNamespace(cov=build_covariances(f, f, r_samp, CovarianceConfig(beta=0.3)))
    same = types.SimpleNamespace(cov=build_covariances(f, f, r_samp, CovarianceConfig(beta=0.3)))
    other = types.SimpleNamespace(cov=build_covariances(f, f, r_samp, CovarianceConfig(beta=0.5, shrinkage=0.1)))
    assert _validation_problems(same, infer, cfg)[0] == []
    problems, _ = _validation_problems(other, infer, cfg)
    assert [p.split(" differently")[0] for p in problems] == ["validation builds R_blend", "validation builds R_eff"]
    assert _validation_problems(None, infer, cfg)[0]  # no validation loss seen: unknown settings is a problem
