"""ris_model as the sweep's target (integrations/ris.py): torch's eigh backward on a tied spectrum is pruned
with the tie named; the gap-aware backward on the same spectrum is not. The full acceptance sweep (6 trials
of 30 quickstart steps, then the report) is the slow test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from ris_stability.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")
# Small trials of the shipped config: 4 samples a step, 8 validation samples, validation after each step.
TINY = ["--set", "data.batch_size=4", "--set", "data.n_val=8", "--set", "train.val_every=1",
        "--set", "model.d_model=16", "--set", "model.d_ff=32", "--set", "model.factor_hidden=32"]
SPACE = """
[params."covariance.shrinkage"]
type = "float"
low = 1e-3
high = 2e-3

[params."loss.eigh_backward"]
type = "categorical"
choices = ["torch", "gap_aware"]
"""


def test_torch_backward_on_ties_is_pruned_with_the_tie_named_gap_aware_is_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.toml").write_text(SPACE)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(storage=storage, study_name="ris")
    for backward in ("torch", "gap_aware"):
        study.enqueue_trial({"covariance.shrinkage": 1e-3, "loss.eigh_backward": backward})
    code = main(["sweep", "--config", QUICKSTART, "--space", "space.toml", "--trials", "2", "--storage", storage,
                 "--study", "ris", "--steps", "2", "--no-trial-reports", *TINY])
    assert code == 0
    trials = {t.params["loss.eigh_backward"]: t for t in optuna.load_study(study_name="ris", storage=storage).trials}
    torch_trial, gap_trial = trials["torch"], trials["gap_aware"]
    assert torch_trial.state.name == "PRUNED" and torch_trial.user_attrs["prune_rule"] == "tie"
    assert "eigenvalues of loss.subspace:linalg.eigh tied at" in torch_trial.user_attrs["prune_reason"]
    assert torch_trial.user_attrs["prune_step"] == 0
    assert gap_trial.state.name == "COMPLETE", gap_trial.user_attrs
    # The same tie is there under the gap-aware backward, and harmless: not a reason to prune.
    first = json.loads(Path(gap_trial.user_attrs["run_dir"], "steps.jsonl").read_text().splitlines()[0])
    assert first["mat/loss.subspace:eigh_gap_aware/max_cluster"] > 1
    assert Path(gap_trial.user_attrs["run_dir"], "config.resolved.toml").read_text().count('eigh_backward = "gap_aware"') == 1


@pytest.mark.slow
def test_acceptance_six_trials_of_thirty_steps_and_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    assert main(["sweep", "--config", QUICKSTART, "--space", str(ROOT / "configs" / "space-quickstart.toml"),
                 "--trials", "6", "--storage", storage, "--study", "accept", "--steps", "30", "--seed", "0"]) == 0
    trials = optuna.load_study(study_name="accept", storage=storage).trials
    assert len(trials) == 6 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    for t in trials:
        if t.params["loss.eigh_backward"] == "torch" and t.user_attrs["ties"]:
            assert t.state.name == "PRUNED" and "tied at" in t.user_attrs["prune_reason"]
    assert main(["report", "--sweep", storage, "--study", "accept"]) == 0
    report = tmp_path / "runs" / "sweep-accept"
    assert (report / "report.md").is_file() and (report / "figures" / "stability_map.png").is_file()
