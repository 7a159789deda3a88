"""Sweep pruning, storage and claims, checked by what a sweep's user sees: the verdict and its reason, the
trials a command delivers, the join that is refused. In-process Optuna studies, no training, no subprocess
(except one short-lived child standing in for a dead worker's trial)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from ris_stability.records import UsageError  # noqa: E402
from ris_stability.sweep import claims, storage, workers  # noqa: E402
from ris_stability.sweep.pruning import StabilityRules, StabilityWatch  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _row(step: int, norm, **extra) -> dict:
    return {"step": step, "grad/_total": norm, **extra}


def _feed(watch: StabilityWatch, norms) -> list:
    verdicts = []
    for step, norm in enumerate(norms):
        watch.observe("step", _row(step, norm))
        verdicts.append(watch.end_step(step))
    return verdicts


# --- pruning ------------------------------------------------------------------------------------------------
def test_grad_norm_max_prunes_at_the_first_step_above_it_not_at_it() -> None:
    watch = StabilityWatch(StabilityRules(grad_norm_max=10.0))
    verdicts = _feed(watch, [10.0, 9.0, 10.5])
    assert verdicts[:2] == [None, None]
    assert verdicts[2].rule == "grad_explosion" and verdicts[2].step == 2
    assert verdicts[2].reason == "gradient explosion: total gradient norm 10.5 at step 2 > limit 10"


def test_nonfinite_norms_stay_out_of_the_explosion_baseline() -> None:
    watch = StabilityWatch(StabilityRules(explode_factor=100.0, baseline_steps=3))
    verdicts = _feed(watch, [math.nan, math.inf, math.nan, 1.0, 2.0, 3.0, 150.0, 250.0])
    assert verdicts[:7] == [None] * 7  # baseline: median(1, 2, 3) = 2; 150 < 200
    assert verdicts[7].rule == "grad_explosion" and verdicts[7].step == 7
    assert "125 x the baseline 2 (median of the first 3 logged steps) > factor 100" in verdicts[7].reason


def test_a_norm_exactly_at_factor_x_baseline_is_not_an_explosion() -> None:
    watch = StabilityWatch(StabilityRules(explode_factor=10.0, baseline_steps=1))
    assert _feed(watch, [2.0, 20.0, 0.0]) == [None, None, None]
    assert watch.end_step(3) is None
    watch.observe("step", _row(3, 20.5))
    assert watch.end_step(3).step == 3


def test_a_zero_baseline_never_prunes_and_bool_or_text_norms_are_ignored() -> None:
    watch = StabilityWatch(StabilityRules(explode_factor=10.0, baseline_steps=2))
    assert _feed(watch, [0.0, 0.0, 1e9]) == [None, None, None]
    other = StabilityWatch(StabilityRules(explode_factor=10.0, baseline_steps=1, grad_norm_max=5.0))
    assert _feed(other, [True, "inf", None, 1.0, 11.0])[-1].reason.startswith(
        "gradient explosion: total gradient norm 11 at step 4 > limit 5")  # the limit is found before the factor


def test_nonfinite_steps_count_once_per_step_and_the_summary_names_the_first() -> None:
    watch = StabilityWatch(StabilityRules(nonfinite_budget=1))
    for step, kind in ((4, "nonfinite_loss"), (4, "nonfinite_grad"), (6, "gradient_spike"), (7, "nonfinite_grad")):
        watch.observe("event", {"kind": kind, "step": step, "message": f"{kind} at {step}"})
    verdict = watch.end_step(7)
    assert verdict.rule == "nonfinite" and verdict.step == 7
    assert verdict.reason == "2 non-finite step(s) > budget 1 (first: nonfinite_loss at 4)"
    summary = watch.summary()
    assert summary["nonfinite_steps"] == 2 and summary["first_nonfinite_step"] == 4
    assert StabilityWatch().summary() == {"nonfinite_steps": 0, "first_nonfinite_step": None, "min_gap": None,
                                          "min_gap_site": "", "ties": []}


def test_tie_verdict_reason_and_priority_over_an_explosion_in_the_same_step() -> None:
    watch = StabilityWatch(StabilityRules(grad_norm_max=1.0))
    watch.observe("step", _row(2, 5.0))
    watch.observe("event", {"kind": "tied_eigenvalues", "step": 2, "data": {
        "matrix": "m.cov:linalg.eigh@a.py:3", "max_cluster": 3, "cluster_value": None, "vec_grad": 1}})
    verdict = watch.end_step(2)
    assert verdict.rule == "tie"
    assert verdict.reason == ("tie: 3 eigenvalues of m.cov:linalg.eigh@a.py:3 tied at None (step 2) while its "
                              "eigenvectors receive gradient; linalg.eigh's backward divides by these zero gaps (0/0). "
                              "Next step: a tie-safe (gap_aware) backward or a spectrum without the tie")


def test_ties_are_listed_but_do_not_prune_when_pruning_on_ties_is_off() -> None:
    watch = StabilityWatch(StabilityRules(prune_on_tie=False, tie_safe_mark=""))
    for step in range(7):
        watch.observe("event", {"kind": "tied_eigenvalues", "step": step, "data": {
            "matrix": "a:eigh_gap_aware", "max_cluster": 2, "cluster_value": 0.5, "vec_grad": True}})
        assert watch.end_step(step) is None
    assert len(watch.ties) == 7 and len(watch.summary()["ties"]) == 5
    assert watch.ties[0] == "2 eigenvalues of a:eigh_gap_aware tied at 5.000e-01 (step 0)"


def test_min_gap_is_the_smallest_finite_gap_of_sites_whose_vectors_get_gradient() -> None:
    watch = StabilityWatch()
    watch.observe("step", {"step": 0, "mat/a/min_gap": 0.3, "mat/a/vec_grad": 1.0, "mat/b/min_gap": 0.1,
                           "mat/b/vec_grad": 0.0, "mat/c/min_gap": math.nan, "mat/c/vec_grad": 1.0})
    watch.observe("step", {"step": 1, "mat/a/min_gap": 0.5, "mat/a/vec_grad": 1.0})
    assert (watch.summary()["min_gap"], watch.summary()["min_gap_site"]) == (0.3, "a")
    watch.observe("step", {"step": 2, "mat/d/min_gap": 0.2, "mat/d/vec_grad": 1.0})
    assert (watch.min_gap, watch.min_gap_site) == (0.2, "d")


@pytest.mark.parametrize("kwargs", [{"nonfinite_budget": -1}, {"baseline_steps": 0}, {"explode_factor": 1.0}])
def test_rules_refuse_each_bad_setting(kwargs) -> None:
    with pytest.raises(ValueError, match="StabilityRules"):
        StabilityRules(**kwargs)
    StabilityRules(nonfinite_budget=0, baseline_steps=1, explode_factor=1.01)


# --- storage ------------------------------------------------------------------------------------------------
# What a trial computes depends on each of these (written out, not read from storage.RESULT_KEYS: a key dropped
# there must fail here).
RESULT = ("target", "config_sha256", "overrides", "steps", "command", "space", "metric", "direction", "rules",
          "startup_trials", "report_every")
SETTINGS = {k: f"value of {k}" for k in RESULT}


@pytest.mark.parametrize("key", RESULT)
def test_joining_a_study_with_another_result_setting_is_refused_naming_it(key) -> None:
    study = optuna.create_study(study_name="s")
    storage.check_settings(study, {**SETTINGS, "workers": 4})
    assert study.user_attrs[storage.SWEEP_ATTR]["target"] == "value of target"
    storage.check_settings(study, {**SETTINGS, "workers": 1, "seed": 9})  # how, not what: joins
    with pytest.raises(UsageError) as err:
        storage.check_settings(study, {**SETTINGS, key: "other"})
    assert str(err.value) == (f"study 's' was created with other settings ({key}: study 'value of {key}', this command "
                              "'other'); join it with the same settings or choose another --study")


def test_a_refused_join_names_every_differing_setting_and_shortens_long_values() -> None:
    study = optuna.create_study(study_name="s")
    storage.check_settings(study, SETTINGS)
    with pytest.raises(UsageError) as err:
        storage.check_settings(study, {**SETTINGS, "target": "t" * 100, "steps": None})
    text = str(err.value)
    assert "target: study 'value of target', this command '" + "t" * 76 + "...; steps: study 'value of steps'" in text
    assert text.endswith("this command None); join it with the same settings or choose another --study")


def test_open_storage_creates_the_sqlite_folder_and_checks_its_arguments(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a' / 'b' / 'sweep.db'}"
    with pytest.raises(UsageError, match="--heartbeat 0: must be >= 1 second"):
        storage.open_storage(url, heartbeat_s=0)
    with pytest.raises(UsageError, match="no such SQLite file"):
        storage.open_storage(url, create=False)
    assert not (tmp_path / "a").exists()
    st = storage.open_storage(url, heartbeat_s=2)
    assert (tmp_path / "a" / "b").is_dir()
    assert st.get_heartbeat_interval() == 2 and st.grace_period == 6
    storage.open_storage(url, create=False)  # now it exists
    storage.check_url("sqlite://", create=False)  # in memory: nothing to find


@pytest.mark.parametrize("url, needle", [("nonsense://x", "no SQLAlchemy dialect or driver"),
                                         ("not a url", "not a database URL")])
def test_check_url_refuses_what_cannot_be_a_database(url, needle) -> None:
    with pytest.raises(UsageError, match=needle):
        storage.check_url(url)


def test_load_study_lists_the_studies_the_storage_holds(tmp_path: Path) -> None:
    st = storage.open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with pytest.raises(UsageError, match="it holds: no study"):
        storage.load_study(st, "x")
    optuna.create_study(study_name="one", storage=st)
    optuna.create_study(study_name="two", storage=st)
    with pytest.raises(UsageError, match=r"study 'x' is not in the storage; it holds: one, two\. Start it"):
        storage.load_study(st, "x")
    assert storage.load_study(st, "two").study_name == "two"


def test_fail_trial_marks_a_running_trial_and_leaves_a_finished_one(tmp_path: Path) -> None:
    study = optuna.create_study()
    running, done = study.ask(), study.ask()
    study.tell(done, 1.0)
    assert storage.fail_trial(study, study.trials[0], "its worker died") is True
    assert storage.fail_trial(study, study.trials[1], "late") is False
    first, second = study.get_trials()
    assert first.state == optuna.trial.TrialState.FAIL
    assert first.user_attrs == {"error": "its worker died", "status": "failed"}
    assert second.state == optuna.trial.TrialState.COMPLETE and "error" not in second.user_attrs


def test_fail_stale_fails_trials_whose_worker_stopped_beating(tmp_path: Path) -> None:
    import datetime

    st = storage.open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat_s=1)
    study = optuna.create_study(storage=st)
    trial = study.ask()
    st.record_heartbeat(trial._trial_id)
    storage.fail_stale(study)
    assert study.get_trials()[0].state == optuna.trial.TrialState.RUNNING  # beating: left alone
    from sqlalchemy import text

    with st.engine.begin() as conn:  # the last beat, a minute ago
        conn.execute(text("UPDATE trial_heartbeats SET heartbeat = :t"),
                      {"t": datetime.datetime.now() - datetime.timedelta(seconds=60)})
    storage.fail_stale(study)
    assert study.get_trials()[0].state == optuna.trial.TrialState.FAIL


# --- claims and workers -------------------------------------------------------------------------------------
def _sampler(seed):
    return optuna.samplers.RandomSampler(seed=seed)


@pytest.mark.parametrize("trials, n_workers", [(7, 2), (5, 3), (1, 2)])
def test_workers_of_one_batch_run_exactly_the_trials_asked(tmp_path: Path, trials, n_workers) -> None:
    study = optuna.create_study()
    ran: list[int] = []
    started = threading.Barrier(n_workers)

    def run_trial(trial):
        ran.append(trial.number)
        study.tell(trial, float(trial.number))

    def worker(out: list) -> None:
        started.wait()
        out.append(workers.run_worker(study, run_trial, "b1", trials, tmp_path, 3, _sampler))

    counts: list[int] = []
    threads = [threading.Thread(target=worker, args=(counts,)) for _ in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran) == list(range(trials)) and sum(counts) == trials
    assert [t.user_attrs[claims.BATCH_ATTR] for t in study.get_trials()] == ["b1"] * trials
    assert {t.user_attrs[claims.WORKER_ATTR] for t in study.get_trials()} == {os.getpid()}
    # a second batch of the same study gets its own trials; a worker of a full batch runs none
    assert workers.run_worker(study, run_trial, "b1", trials, tmp_path, 3, _sampler) == 0
    assert workers.run_worker(study, run_trial, "b2", 2, tmp_path, 3, _sampler) == 2
    assert len(claims.batch_trials(study, "b2")) == 2 and len(claims.batch_trials(study, "b1")) == trials


def test_claim_seeds_the_sampler_from_the_seed_and_the_study_size(tmp_path: Path) -> None:
    assert claims.trial_seed(None, 4) is None
    assert claims.trial_seed(2, 5) == 2 * 1_000_003 + 5
    assert claims.trial_seed(2**31, 7) == (2**31 * 1_000_003 + 7) % 2**32
    seeds: list = []
    study = optuna.create_study()
    study.ask()  # a trial of another batch counts in the study's size
    trial = claims.claim(study, "b", 3, tmp_path, 11, lambda s: seeds.append(s) or _sampler(s))
    assert seeds == [claims.trial_seed(11, 1)] and trial.number == 1
    assert (tmp_path / claims.LOCK_FILE).exists()


def test_heartbeat_beats_while_the_trial_runs(tmp_path: Path) -> None:
    st = storage.open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat_s=1)
    study = optuna.create_study(storage=st)
    trial = study.ask()
    with claims.heartbeat(study, trial):
        pass
    storage.fail_stale(study)
    assert study.get_trials()[0].state == optuna.trial.TrialState.RUNNING
    from sqlalchemy import text

    with st.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM trial_heartbeats")).scalar() == 1
    memory = optuna.create_study()
    with claims.heartbeat(memory, memory.ask()):  # no heartbeat support: the block just runs
        pass


def test_signal_names_and_death_reasons() -> None:
    assert workers.signal_name(-9) == "SIGKILL (signal 9)"
    assert workers.signal_name(-99) == "signal 99"
    assert workers.death_reason(12, -9) == ("its worker (pid 12) was killed by SIGKILL (signal 9) during this trial; "
                                            "the kernel's out-of-memory killer sends it too (see dmesg)")
    assert workers.death_reason(12, -15) == "its worker (pid 12) was killed by SIGTERM (signal 15) during this trial"
    assert workers.death_reason(12, 3) == ("its worker (pid 12) exited with code 3 during this trial (see the sweep's "
                                           "log)")
    assert workers.worker_command(["sweep", "--x"]) == [sys.executable, "-m", "ris_stability.cli", "sweep", "--x"]


def test_fail_orphans_fails_only_the_dead_workers_running_trials_and_ends_their_process() -> None:
    study = optuna.create_study()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine, other, finished = study.ask(), study.ask(), study.ask()
        for trial, pid in ((mine, 111), (other, 222), (finished, 111)):
            trial.set_user_attr(claims.WORKER_ATTR, pid)
        mine.set_user_attr("trial_pid", child.pid)
        study.tell(finished, 0.0)
        assert workers.fail_orphans(study, 111, -9) == [0]
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "RUNNING", "COMPLETE"]
    assert study.get_trials()[0].user_attrs["error"].startswith("its worker (pid 111) was killed by SIGKILL")
    assert workers.fail_orphans(study, 333, 1) == []


def test_launch_reports_the_worst_worker_exit() -> None:
    loads: list[int] = []
    study = optuna.create_study()

    def load():
        loads.append(1)
        return study

    py = [sys.executable, "-c"]
    assert workers.launch([py + ["pass"], py + ["pass"]], load) == 0 and loads == []
    assert workers.launch([py + ["raise SystemExit(2)"], py + ["pass"]], load) == workers.EXIT_USAGE
    assert workers.launch([py + ["raise SystemExit(5)"], py + ["pass"]], load) == workers.EXIT_WORKER_LOST
    assert workers.launch([py + ["raise SystemExit(5)"], py + ["raise SystemExit(2)"]], load) == workers.EXIT_USAGE
    assert workers.launch([py + ["import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]], load) == \
        workers.EXIT_WORKER_LOST
    assert len(loads) == 5  # the study is looked at once per failed worker


def test_op_names_of_sites_with_several_colons_and_call_sites() -> None:
    from ris_stability.sweep.pruning import op_of

    assert op_of("enc.a:b:linalg.eigh@x.py:3@y.py:4") == "linalg.eigh"
    assert op_of("linalg.svd") == "linalg.svd" and op_of("m:op@a@b") == "op"


def test_a_baseline_below_one_still_catches_an_explosion_and_only_mat_gap_columns_count() -> None:
    watch = StabilityWatch(StabilityRules(explode_factor=10.0, baseline_steps=2))
    assert _feed(watch, [0.5, 0.5, 5.5])[-1].reason.endswith("x the baseline 0.5 (median of the first 2 logged "
                                                              "steps) > factor 10")
    other = StabilityWatch()
    other.observe("step", {"step": 0, "x/min_gap": 0.1, "x/vec_grad": 1.0, "mat/s/min_gap": 0.4,
                           "mat/s/vec_grad": 1.0, "mat/t/min_gap": 0.2, "mat/t/vec_grad": True})
    assert (other.min_gap, other.min_gap_site) == (0.2, "t")


def test_a_tie_event_without_details_is_still_named() -> None:
    watch = StabilityWatch()
    watch.observe("event", {"kind": "nonfinite_grad", "step": 0})
    watch.observe("event", {"kind": "tied_eigenvalues", "step": 1, "data": {"vec_grad": 1}})
    assert watch.ties == ["0 eigenvalues of ? tied at None (step 1)"]
    assert watch.end_step(1).rule == "tie"
    assert watch.summary()["nonfinite_steps"] == 1 and watch.first_nonfinite == ""


def test_a_refused_join_shows_values_of_80_characters_whole() -> None:
    study = optuna.create_study(study_name="s")
    storage.check_settings(study, SETTINGS)
    with pytest.raises(UsageError) as err:
        storage.check_settings(study, {**SETTINGS, "target": "t" * 78})  # repr: 80 characters
    assert "this command '" + "t" * 78 + "')" in str(err.value)
