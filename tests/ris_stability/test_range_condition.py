"""The conditioning of a matrix on its numerical range: finite where cond = inf says only "singular"."""
from __future__ import annotations

import math

import pytest
import torch

from ris_stability.numerics.spectrum import columns, eigen_table, singular_table
from ris_stability.numerics.stats import matrix_stats
from ris_stability.records import TraceWriter
from ris_stability.report.build import build_report
from tests.ris_stability.trace_factory import DEFAULT_META


def _cols(table):
    return {k: float(v) for k, v in columns(table, ("rank", "log10_cond", "range_log10_cond")).items()}


def test_range_condition_of_a_singular_spectrum_skips_the_null_space():
    got = _cols(eigen_table(torch.tensor([0.0, 1e-20, 1e-2, 1.0], dtype=torch.float64)))
    assert got["rank"] == 2 and got["log10_cond"] == math.inf
    assert got["range_log10_cond"] == pytest.approx(2.0)


def test_range_condition_equals_the_condition_of_a_regular_matrix():
    got = _cols(eigen_table(torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)))
    assert got["log10_cond"] == pytest.approx(1.0) and got["range_log10_cond"] == pytest.approx(1.0)


def test_range_condition_of_singular_values_and_of_zero():
    got = _cols(singular_table(torch.tensor([1.0, 1e-3, 0.0], dtype=torch.float64)))
    assert got["rank"] == 2 and got["range_log10_cond"] == pytest.approx(3.0)
    assert math.isnan(_cols(eigen_table(torch.zeros(3, dtype=torch.float64)))["range_log10_cond"])


def test_rank_deficient_covariance_range_condition_from_its_snapshots():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(8, 3, dtype=torch.float64, generator=gen)
    R = X @ X.T
    ev = torch.linalg.eigvalsh(R)
    stats = matrix_stats(R)
    assert float(stats["rank"]) == 3 and float(stats["log10_cond"]) == math.inf
    assert float(stats["range_log10_cond"]) == pytest.approx(math.log10(ev[-1] / ev[-3]), rel=1e-9)


def test_report_table_shows_the_range_condition_of_a_singular_matrix(tmp_path):
    run = tmp_path / "run"
    with TraceWriter(run, DEFAULT_META) as writer:
        writer.event("run_start", "info", "run started", step=0)
        for step in range(6):
            writer.step({"step": step, "loss": 1.0, "mat/C/n": 8, "mat/C/rank": 3, "mat/C/cond": math.inf,
                         "mat/C/log10_cond": math.inf, "mat/C/range_log10_cond": 2.0 + 0.5 * (step == 5),
                         "mat/C/lambda_max": 1.0, "mat/C/min_gap": 0.1, "mat/C/max_cluster": 1},)
            writer.step({"step": step + 100, "loss": 1.0, "mat/F/n": 4, "mat/F/rank": 4, "mat/F/cond": 10.0,
                         "mat/F/log10_cond": 1.0, "mat/F/range_log10_cond": 1.0, "mat/F/lambda_max": 1.0})
    text = build_report(run).read_text()
    row_c = next(line for line in text.splitlines() if line.startswith("| `C`"))
    row_f = next(line for line in text.splitlines() if line.startswith("| `F`"))
    assert "inf / inf / inf<br>range: 2 / 2 / 2.5" in row_c
    assert "range" not in row_f  # a regular matrix: its condition number already says it
