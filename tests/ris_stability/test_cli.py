"""`risdiag` end to end on small versions of the shipped configs: trace, bisect, report, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ris_stability.records.capsule import Capsule
from ris_stability.cli import main
from ris_stability.records import read_trace
from ris_stability.numerics.tolerances import tie_tol

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

ROOT = Path(__file__).resolve().parents[2]
NO_VAL = ["--set", "train.val_every=0", "--set", "data.n_val=0"]
SMALL = ["--set", "data.batch_size=4", *NO_VAL]


def trace(tmp: Path, config: str, steps: int, *extra: str, small: bool = True) -> tuple[int, Path]:
    out = tmp / Path(config).stem
    code = main(["trace", "--config", str(ROOT / "configs" / config), "--steps", str(steps), "--out", str(out),
                 "--no-live", "--no-report", *(SMALL if small else NO_VAL), *extra])
    return code, out


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Path:
    """seed-nan for 2 steps. Its noise eigenvalues always tie within rounding; whether float32 eigh returns
    some of them bit-equal (the 0/0) depends on the LAPACK build, so the exit code must follow what the
    trace recorded rather than a fixed step list."""
    code, out = trace(tmp_path_factory.mktemp("nan"), "seed-nan.toml", 2, small=False)
    assert code == (1 if read_trace(out).nonfinite_steps else 0)
    return out


def require_nonfinite(run: Path) -> int:
    steps = read_trace(run).nonfinite_steps
    if not steps:
        pytest.skip("this LAPACK returned no bit-equal tie in seed-nan's first steps: no NaN to follow")
    return steps[0]


def test_seed_nan_trace_records_the_tie_before_the_nan(nan_run):
    t = read_trace(nan_run)
    site = "loss.subspace:linalg.eigh"
    assert t.steps.loc[0, f"mat/{site}/max_cluster"] > 100  # the noise eigenvalues tie ...
    # ... within rounding (the probe samples 4 of the 16 matrices), in the forward of the first step
    lam_max = t.steps.loc[0, f"mat/{site}/lambda_max"]
    assert t.steps.loc[0, f"mat/{site}/min_gap"] <= tie_tol(144, torch.float32, lam_max)
    assert t.steps.loc[0, f"mat/{site}/vec_grad"] == 1.0
    first = require_nonfinite(nan_run)
    ev = next(e for e in t.events if e["kind"] == "nonfinite_grad")
    assert ev["step"] == first and ev["data"]["matrix"] == site and ev["data"]["module"] == "loss.subspace"
    assert "ris_model/loss.py" in ev["data"]["location"]  # the eigh call of the Subspace term
    assert any(e["kind"] == "capsule_written" and e["step"] == first for e in t.events)
    assert all(bool(t.steps.loc[s, "skipped"]) for s in t.nonfinite_steps)


def test_bisect_names_op_module_line_and_cause(nan_run, tmp_path, capsys):
    require_nonfinite(nan_run)
    code = main(["bisect", str(nan_run), "--json", "--float64", "--export", str(tmp_path / "repro")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    f = out["finding"]
    assert out["reproduced"] and out["bit_exact"]
    assert f["phase"] == "backward" and f["node"] == "LinalgEighBackward0"
    assert f["module"] == "loss.subspace"
    assert any(frame.startswith("ris_model/loss.py:") or "/ris_model/loss.py:" in frame for frame in f["stack"])
    assert "tied eigenvalues" in f["cause"] and "cluster of" in f["cause"]
    assert "with ris_stability.gap_aware():" in f["remedies"][0]  # the generic one-line fix first ...
    assert 'loss.eigh_backward = "gap_aware"' in f["remedies"][1]  # ... then ris_model's config key
    assert any("diagonal loading" in r and "lifted above the rounding floor" in r for r in f["remedies"])
    assert out["float64"]["verdict"] == "precision"  # finite in float64: the ties are a float32 artefact
    assert (nan_run / "finding.json").is_file()
    run = subprocess.run([sys.executable, str(tmp_path / "repro" / "reproduce.py")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    bad = int(run.stdout.split("backward: gradient of input 0 has ")[1].split()[0])
    assert bad > 0


def test_report_of_the_nan_run(nan_run, tmp_path):
    first = require_nonfinite(nan_run)
    assert main(["report", str(nan_run), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "loss.subspace:linalg.eigh" in text and f"step {first}" in text.lower()


def test_clean_config_exits_zero(tmp_path):
    code, out = trace(tmp_path, "quickstart.toml", 2)
    assert code == 0
    assert read_trace(out).nonfinite_steps == []


def test_gap_aware_backward_runs_the_nan_config_clean(tmp_path):
    code, out = trace(tmp_path, "seed-nan.toml", 2, "--set", "loss.eigh_backward=gap_aware", small=False)
    assert code == 0
    t = read_trace(out)
    assert t.nonfinite_steps == []
    assert "mat/loss.subspace:eigh_gap_aware/max_cluster" in t.steps.columns


def test_gap_aware_option_runs_the_nan_config_clean_and_restores_torch(tmp_path):
    eigh, svd = torch.linalg.eigh, torch.linalg.svd
    code, out = trace(tmp_path, "seed-nan.toml", 2, "--gap-aware", small=False)  # loss.eigh_backward = "torch"
    assert code == 0
    assert read_trace(out).nonfinite_steps == []
    assert (torch.linalg.eigh, torch.linalg.svd) == (eigh, svd)


@pytest.mark.parametrize("args, needle", [
    (["trace", "--config", str(CONFIG_DIR / "quickstart.toml"), "--set", "train.nope=1"], "unknown key 'train.nope'"),
    (["trace", "--config", "missing.toml"], "does not exist"),
    (["trace", "--config", str(CONFIG_DIR / "quickstart.toml"), "--set", "scene.range_m=[-1, 2]"], "scene.range_m"),
    (["trace", "--config", str(CONFIG_DIR / "quickstart.toml"), "--set", "model.n_heads=7"], "model.n_heads"),
    (["trace", "--config", str(CONFIG_DIR / "quickstart.toml"), "--out", "/proc/forbidden/run"], "cannot write there"),
    (["bisect", "no/such/capsule.pt"], "does not exist"),
    (["report", "."], "run folder"),
], ids=["unknown-key", "missing-config", "negative-range", "unbuildable-model", "unwritable-out", "missing-capsule",
        "not-a-run"])
def test_usage_errors_exit_2_without_traceback(args, needle, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # any folder: the paths above do not depend on it
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bisect_corrupted_and_unreproducible_capsules(nan_run, tmp_path, capsys):
    require_nonfinite(nan_run)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["bisect", str(bad)]) == 2
    cap = Capsule.load(sorted((nan_run / "capsules").glob("*.pt"))[0])
    cap.config_text = cap.config_text.replace("shrinkage = ", "shrinkage = 0.0 #")
    finite = cap.save(tmp_path / "finite.pt")
    assert main(["bisect", str(finite)]) == 3
    assert "did not reproduce" in capsys.readouterr().out
