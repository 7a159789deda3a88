"""Sweep workers as real processes on one SQLite storage: a shared study, no duplicated trial, a killed
worker that leaves the study usable (its trial FAIL by heartbeat, the other worker finishing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from ris_stability.sweep.storage import fail_stale, open_storage  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TARGET = f"{ROOT / 'tests' / 'ris_stability' / 'sweep_target.py'}:make_target"
SPACE = '[params."train.lr"]\ntype = "float"\nlow = 1e-3\nhigh = 1e-1\nlog = true\n'
TIMEOUT_S = 300


def sweep_cmd(tmp: Path, trials: int, workers: int, *extra: str) -> list[str]:
    (tmp / "space.toml").write_text(SPACE)
    return [sys.executable, "-m", "ris_stability.cli", "sweep", "--config", "", "--space", str(tmp / "space.toml"),
            "--trials", str(trials), "--workers", str(workers), "--storage", f"sqlite:///{tmp / 'db.sqlite'}",
            "--study", "w", "--target", TARGET, "--out", str(tmp / "runs"), "--no-trial-reports", "--heartbeat", "1",
            *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}


def load(tmp: Path) -> optuna.Study:
    return optuna.load_study(study_name="w", storage=open_storage(f"sqlite:///{tmp / 'db.sqlite'}", heartbeat_s=1))


def test_two_workers_share_one_study_without_duplicates(tmp_path):
    run = subprocess.run(sweep_cmd(tmp_path, 7, 2, "--steps", "4"), cwd=tmp_path, env=env(), capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    trials = load(tmp_path).get_trials()
    assert sorted(t.number for t in trials) == list(range(7))  # odd: no share of the trials is dropped
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)  # the median pruner may stop some
    assert len({t.user_attrs["run_dir"] for t in trials}) == 7
    pids = [t.user_attrs["pid"] for t in trials]
    assert len(set(pids)) == 2  # both workers claimed trials (as many as each could: no fixed shares)


def _started_a_trial(log: Path) -> bool:
    # The worker logs "trial N: params -> folder" once the trial is RUNNING in the storage; reading its log
    # keeps this test's own connections out of the storage while the workers create it.
    return "sweep.trial: trial " in log.read_text()


def test_killed_worker_fails_its_trial_and_the_other_finishes(tmp_path):
    # Trials of 30 steps of 0.1 s: a few seconds each, so the kill lands inside one even on a loaded machine.
    slow = ["--steps", "30", "--set", "train.sleep_s=0.1", "--set", "train.val_every=100"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(sweep_cmd(tmp_path, 20, 1, *slow), cwd=tmp_path, env=env(), stdout=log, stderr=log)
    deadline = time.monotonic() + TIMEOUT_S
    while not _started_a_trial(tmp_path / "first.log"):
        assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    other = subprocess.Popen(sweep_cmd(tmp_path, 2, 1, *slow), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    log.close()
    _, err = other.communicate(timeout=TIMEOUT_S)
    assert other.returncode == 0, err[-3000:]
    time.sleep(3.5)  # past the grace period (3 heartbeats of 1 s) of the killed worker's trial
    study = load(tmp_path)
    fail_stale(study)
    trials = study.get_trials()
    killed = [t for t in trials if t.user_attrs.get("pid") == first.pid]
    survivor = [t for t in trials if t.user_attrs.get("pid") == other.pid]
    assert [t.state.name for t in killed][-1] == "FAIL" and "error" not in killed[-1].user_attrs
    assert len(survivor) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in survivor)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # every trial accounted for, once
