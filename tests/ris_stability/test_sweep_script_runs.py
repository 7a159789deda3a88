"""Script sweeps that run: an outside-style script (plain argparse, no ris_stability import) swept through
the command template, its trials traced in their own processes and pruned inside the running script.

The default suite runs two enqueued trials in one worker (one per broken region). The slow ones are the
acceptance runs: 2 workers on SQLite over 6 trials (report, best command re-run), and a worker killed by
SIGKILL in the middle of a trial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from ris_stability.cli import main  # noqa: E402
from ris_stability.sweep.command import SweepOptions, run_sweep  # noqa: E402
from ris_stability.sweep.metrics import last_json_metrics  # noqa: E402
from ris_stability.sweep.storage import open_storage  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "tests" / "ris_stability" / "scripts" / "sweep_toy.py")
SPACE = '[params.lr]\ntype = "float"\nlow = 0.01\nhigh = 3.0\nlog = true\n\n[params.eps]\ntype = "float"\nlow = -1.0\nhigh = 1.0\n'
TIMEOUT_S = 600


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}


def sweep_argv(tmp: Path, trials: int, workers: int, *script_args: str) -> list[str]:
    (tmp / "space.toml").write_text(SPACE)
    return [sys.executable, "-m", "ris_stability.cli", "sweep", "--space", str(tmp / "space.toml"), "--trials",
            str(trials), "--workers", str(workers), "--storage", f"sqlite:///{tmp / 'db.sqlite'}", "--study", "toy",
            "--seed", "0", "--out", str(tmp / "runs"), "--metric", "val_loss", "--no-trial-reports", "--heartbeat", "1",
            "--", "python", TOY, "--lr", "{lr}", "--eps", "{eps}", *script_args]


def load(tmp: Path) -> optuna.Study:
    return optuna.load_study(study_name="toy", storage=open_storage(f"sqlite:///{tmp / 'db.sqlite'}", 1, create=False))


def test_each_broken_region_is_pruned_inside_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    (tmp_path / "space.toml").write_text(SPACE)
    study = optuna.create_study(storage=storage, study_name="toy")
    study.enqueue_trial({"lr": 0.1, "eps": -0.9})  # sqrt of a negative number from step 0
    study.enqueue_trial({"lr": 2.5, "eps": 0.1})  # gradient descent diverges
    opts = SweepOptions(space=str(tmp_path / "space.toml"), trials=2, storage=storage, study="toy",
                        command=("python", TOY, "--lr", "{lr}", "--eps", "{eps}"), metric="val_loss",
                        out=str(tmp_path / "runs"), trial_reports=False, tensorboard=str(tmp_path / "tb"))
    code, study = run_sweep(opts)
    assert code == 0
    nan, boom = sorted(study.get_trials(), key=lambda t: t.number)
    assert nan.state.name == boom.state.name == "PRUNED"
    assert nan.user_attrs["prune_rule"] == "nonfinite" and nan.user_attrs["prune_step"] == 0
    assert "located: op aten.sqrt in model at" in nan.user_attrs["prune_reason"]
    assert nan.user_attrs["steps_run"] == 2  # stopped inside the script at the locator's step, not after 30
    assert boom.user_attrs["prune_rule"] == "grad_explosion"
    assert boom.user_attrs["steps_run"] == boom.user_attrs["prune_step"] + 1 < 30
    assert "trained" not in (Path(boom.user_attrs["run_dir"]) / "stdout.txt").read_text()  # the script never ended
    for trial in ("trial-0000", "trial-0001"):  # --tensorboard: one TensorBoard run per trial
        assert list((tmp_path / "tb" / trial).glob("events.out.tfevents.*")), trial


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    run = subprocess.run(sweep_argv(tmp, 6, 2), cwd=tmp, env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    return tmp, run


@pytest.mark.slow
def test_two_workers_sweep_the_script_and_account_for_every_trial(toy_sweep):
    tmp, run = toy_sweep
    assert run.returncode == 0, run.stderr[-3000:]
    trials = sorted(load(tmp).get_trials(), key=lambda t: t.number)
    assert [t.number for t in trials] == list(range(6)) and all(t.state.is_finished() for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    pruned = {t.user_attrs["prune_rule"]: t for t in trials if t.state.name == "PRUNED"}
    assert set(pruned) == {"nonfinite", "grad_explosion"}, [t.user_attrs for t in trials]
    assert "located: op aten.sqrt in model" in pruned["nonfinite"].user_attrs["prune_reason"]
    assert pruned["nonfinite"].params["eps"] < -0.3 and pruned["grad_explosion"].params["lr"] > 0.6
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and all(t.user_attrs["status"] == "stable" for t in done)
    assert all(t.user_attrs["metric_source"] == "final JSON line" for t in done)


@pytest.mark.slow
def test_sweep_report_and_best_command_reproduce_the_best_trial(toy_sweep):
    tmp, _ = toy_sweep
    out = tmp / "report" / "report.md"
    assert main(["report", "--sweep", f"sqlite:///{tmp / 'db.sqlite'}", "--study", "toy", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| pruned: nonfinite |" in text and "| pruned: grad_explosion |" in text and "aten.sqrt" in text
    best_file = tomllib.loads((out.parent / "best.toml").read_text())
    best = load(tmp).best_trial
    assert best_file["params"] == best.params
    assert best_file["script"]["env"] == {"RISDIAG_PARAM_LR": repr(best.params["lr"]),
                                          "RISDIAG_PARAM_EPS": repr(best.params["eps"])}
    rerun = subprocess.run([sys.executable, "-m", "ris_stability.cli", "trace", "--no-live", "--no-report", "--out",
                            str(tmp / "best-run"), "--", *best_file["script"]["command"]], cwd=tmp, env=env(),
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert last_json_metrics(rerun.stdout)["val_loss"] == best.value


@pytest.mark.slow
def test_a_worker_killed_mid_trial_fails_its_trial_and_the_other_finishes(tmp_path):
    # 20 steps of 0.15 s: each trial trains for 3 s, so the kill lands inside one even on a loaded machine
    log = open(tmp_path / "sweep.log", "w")
    sweep = subprocess.Popen(sweep_argv(tmp_path, 4, 2, "--steps", "20", "--sleep", "0.15"), cwd=tmp_path, env=env(),
                             stdout=log, stderr=log)
    deadline = time.monotonic() + TIMEOUT_S
    specs: list[Path] = []
    while not specs:  # a trial's spec is written by its worker just before the trial's process starts
        assert time.monotonic() < deadline and sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(0.1)
        specs = sorted((tmp_path / "runs").glob("trial-*/sweep_trial.json"))
    time.sleep(1.5)  # its process is starting or training (it needs seconds to import torch, 3 s to train)
    victim = json.loads(specs[0].read_text())["parent_pid"]
    os.kill(victim, signal.SIGKILL)
    code = sweep.wait(timeout=TIMEOUT_S)
    log.close()
    text = (tmp_path / "sweep.log").read_text()
    assert code != 0, text[-3000:]
    assert f"worker pid {victim} was killed by SIGKILL (signal 9)" in text
    trials = load(tmp_path).get_trials()
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)  # --trials 4: four finished trials
    killed = [t for t in trials if t.user_attrs["pid"] == victim]
    assert [t.state.name for t in killed] == ["FAIL"]
    assert f"its worker (pid {victim}) was killed by SIGKILL (signal 9) during this trial" in killed[0].user_attrs["error"]
    others = [t for t in trials if t.user_attrs["pid"] != victim]
    assert len(others) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in others)
    stat = Path(f"/proc/{killed[0].user_attrs.get('trial_pid', 0)}/stat")  # the killed worker's trial process ended
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"
