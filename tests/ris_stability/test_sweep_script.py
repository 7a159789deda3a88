"""Script sweeps without running a trial: the command template, checks made before any trial (exit 2, one
line, no storage), the in-script listener's decisions from synthetic trace records, the metric sources,
and a resumed study drawing new parameters."""

from __future__ import annotations

import os

from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from ris_stability.cli import main  # noqa: E402
from ris_stability.sweep.command import SweepOptions, open_study, run_sweep  # noqa: E402
from ris_stability.sweep.metrics import add_handler, last_json_metrics, report_metric  # noqa: E402
from ris_stability.sweep.pruning import StabilityRules  # noqa: E402
from ris_stability.sweep.script_trial import metric_value  # noqa: E402
from ris_stability.sweep.space import load_space  # noqa: E402
from ris_stability.sweep.template import CommandTemplate, TemplateError, env_name  # noqa: E402
from ris_stability.sweep.trial_ear import TrialEar, TrialStop  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "tests" / "ris_stability" / "scripts" / "sweep_toy.py")
TARGET = f"{ROOT / 'tests' / 'ris_stability' / 'sweep_target.py'}:make_target"
SPACE = '[params.lr]\ntype = "float"\nlow = 0.01\nhigh = 3.0\nlog = true\n\n[params.eps]\ntype = "float"\nlow = -1.0\nhigh = 1.0\n'


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- the command template ----------------------------------------------------------------------------------
def test_template_fills_arguments_and_environment():
    t = CommandTemplate.parse(["--", "python", "train.py", "--lr", "{lr}", "--tag=run-{model.act}", "{{literal}}"])
    assert t.names == ["lr", "model.act"]
    params = {"lr": 0.0125, "model.act": "relu", "weight_decay": 1e-4, "flag": True}
    assert t.render(params) == ["python", "train.py", "--lr", "0.0125", "--tag=run-relu", "{literal}"]
    assert t.env(params) == {"RISDIAG_PARAM_LR": "0.0125", "RISDIAG_PARAM_MODEL_ACT": "relu",
                             "RISDIAG_PARAM_WEIGHT_DECAY": "0.0001", "RISDIAG_PARAM_FLAG": "true"}
    assert env_name("weight-decay") == "RISDIAG_PARAM_WEIGHT_DECAY"


def test_template_placeholder_missing_from_space_names_it():
    t = CommandTemplate.parse(["python", "train.py", "--lr", "{lr}", "--wd", "{wd}"])
    with pytest.raises(TemplateError, match=r"placeholder \{wd\} is not a parameter of the space file s.toml"):
        t.check(["lr"], "s.toml")


# -- errors before any trial: exit 2, one line, no storage, no run folder ----------------------------------------
UP_FRONT = [
    ("metric-nosuch", ["--metric", "nosuch"], ["python", TOY, "--lr", "{lr}", "--eps", "{eps}"],
     "--metric 'nosuch': not a metric of the trace (loss, loss/TERM) and not named in"),
    ("placeholder-missing", [], ["python", TOY, "--lr", "{lr}", "--eps", "{epsilon}"],
     "placeholder {epsilon} is not a parameter of the space file"),
    ("script-missing", [], ["python", "no_such_train.py", "--lr", "{lr}"], "script 'no_such_train.py' not found"),
    ("module-missing", [], ["python", "-m", "no_such_pkg.train", "--lr", "{lr}"], "module 'no_such_pkg.train' cannot be found"),
    ("config-with-command", ["--config", "c.toml"], ["python", TOY, "--lr", "{lr}"],
     "--config apply to config sweeps, not to a command"),
    ("bad-storage-url", ["--storage", "nonsense://x"], ["python", TOY, "--lr", "{lr}"],
     "--storage 'nonsense://x': no SQLAlchemy dialect or driver"),
    ("nothing-to-sweep", [], [], "sweep needs a command ('-- python train.py --lr {lr}') or --config CONFIG"),
]


@pytest.mark.parametrize("extra, command, needle", [(e, c, n) for _, e, c, n in UP_FRONT], ids=[i for i, *_ in UP_FRONT])
def test_script_sweep_errors_exit_2_before_any_trial(tmp_path, capsys, monkeypatch, extra, command, needle):
    monkeypatch.chdir(tmp_path)
    space = write(tmp_path / "space.toml", SPACE)
    opts = {"--storage": f"sqlite:///{tmp_path / 'db.sqlite'}", "--metric": "val_loss"}
    opts.update(dict(zip(extra[::2], extra[1::2])))
    code = main(["sweep", "--space", space, "--trials", "2", "--study", "s", "--out", str(tmp_path / "runs"),
                 *[x for kv in opts.items() for x in kv], *(["--", *command] if command else [])])
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len(captured.err.strip().splitlines()) <= 3  # one message (the error console may wrap it)
    assert not (tmp_path / "db.sqlite").exists() and not (tmp_path / "runs").exists()  # nothing ran, nothing made


def test_mismatched_join_exits_2_naming_what_differs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write(tmp_path / "space.toml", SPACE)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    first = SweepOptions(space=space, trials=1, storage=storage, study="s", metric="val_loss",
                         command=("python", TOY, "--lr", "{lr}", "--eps", "{eps}"))
    open_study(first, load_space(space).to_dict())  # the study as the first command made it, no trial yet
    code = main(["sweep", "--space", space, "--trials", "1", "--storage", storage, "--study", "s", "--metric",
                 "val_loss", "--out", str(tmp_path / "runs"), "--", "python", TOY, "--lr", "{lr}", "--eps", "{eps}",
                 "--steps", "5"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "study 's' was created with other settings (command: study ['python'," in err
    assert "this command ['python'," in err and "space:" not in err and "metric:" not in err
    assert optuna.load_study(study_name="s", storage=storage).get_trials() == []  # no trial ran


def test_report_of_a_mistyped_storage_creates_nothing(tmp_path, capsys):
    out = tmp_path / "rep" / "report.md"
    code = main(["report", "--sweep", f"sqlite:///{tmp_path / 'typo' / 'db.sqlite'}", "--study", "s", "--out", str(out)])
    assert code == 2
    assert "no such SQLite file" in " ".join(capsys.readouterr().err.split())
    assert list(tmp_path.iterdir()) == []


# -- the trial's listener, fed synthetic trace records ------------------------------------------------------
def _event(kind, step, **data):
    return {"kind": kind, "step": step, "message": f"{kind} at step {step}", "data": data}


def test_nonfinite_waits_for_the_finding_and_names_the_op():
    ear = TrialEar("loss")
    ear("event", _event("nonfinite_loss", 0))
    ear("step", {"step": 0, "loss": "nan"})  # no finding yet: the locator runs on the next step
    ear("event", _event("finding", 1, finding={"node": "aten.sqrt", "module": "model", "location": "train.py:28",
                                               "phase": "forward"}))
    with pytest.raises(TrialStop) as stop:
        ear("step", {"step": 1, "loss": "nan"})
    assert stop.value.code == 0
    assert ear.verdict.rule == "nonfinite" and ear.verdict.step == 0
    assert ear.verdict.reason.startswith(  # the op first: the report's table cuts long reasons
        "non-finite from step 0, located: op aten.sqrt in model at train.py:28 (phase forward); 1 non-finite step(s)")


def test_nonfinite_without_a_finding_stops_after_the_locator_attempts():
    ear = TrialEar("loss")
    ear("event", _event("nonfinite_grad", 0))
    for step in range(3):
        ear("step", {"step": step, "loss": 1.0})
    with pytest.raises(TrialStop):
        ear("step", {"step": 3, "loss": 1.0})
    assert "the locator named no op" in ear.verdict.reason


def test_explosion_stops_at_its_step():
    ear = TrialEar("loss", StabilityRules(explode_factor=100.0))
    for step in range(5):
        ear("step", {"step": step, "loss": 1.0, "grad/_total": 1.0})
    with pytest.raises(TrialStop):
        ear("step", {"step": 5, "loss": 1.0, "grad/_total": 1e3})
    assert (ear.verdict.rule, ear.verdict.step) == ("grad_explosion", 5)


class FakeTrial:
    def __init__(self, prune_at: int):
        self.reports, self.prune_at = [], prune_at

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return len(self.reports) > self.prune_at


def test_intermediate_values_reach_the_median_pruner_from_the_trace_and_from_report_metric():
    trial = FakeTrial(prune_at=2)
    ear = TrialEar("loss", trial=trial)
    ear("step", {"step": 0, "loss": 3.0})
    ear("step", {"step": 1, "loss": "nan"})  # not finite: not reported
    ear("step", {"step": 2, "loss": 2.0})
    with pytest.raises(TrialStop):
        ear("step", {"step": 3, "loss": 1.5})
    assert trial.reports == [(0, 3.0), (2, 2.0), (3, 1.5)]
    assert ear.verdict.rule == "median" and "loss 1.5 at step 3" in ear.verdict.reason

    ear = TrialEar("val_acc", trial=FakeTrial(prune_at=10))
    remove = add_handler(ear.on_metric)
    try:
        ear("step", {"step": 4, "loss": 1.0})
        report_metric("val_acc", 0.5)
    finally:
        remove()
    assert ear.trial.reports == [(4, 0.5)] and ear.reported == {"val_acc": 0.5}


def test_a_trial_whose_worker_is_gone_stops():
    ear = TrialEar("loss", parent_pid=os.getppid() + 1)  # not our parent (1 is, for a process run under nohup)
    with pytest.raises(TrialStop):
        ear("step", {"step": 0, "loss": 1.0})
    assert ear.orphaned and ear.verdict is None


def test_metric_sources_in_order_of_precedence():
    stdout = 'epoch 1\n{"val_loss": 0.5, "acc": 0.9}\nnot json {\n'
    assert last_json_metrics(stdout) == {"val_loss": 0.5, "acc": 0.9}
    assert metric_value("val_loss", {"reported": {"val_loss": 0.25}}, stdout) == (0.25, "report_metric")
    assert metric_value("val_loss", {"reported": {}}, stdout) == (0.5, "final JSON line")
    assert metric_value("loss", {"reported": {}, "trace_last": 1.5}, stdout) == (1.5, "trace")
    assert metric_value("nosuch", {"reported": {}, "trace_last": 1.5}, stdout) == (None, "")


# -- resuming a study ------------------------------------------------------------------------------------------
def _params(study):
    return [tuple(sorted(t.params.items())) for t in sorted(study.get_trials(), key=lambda t: t.number)]


def test_resumed_study_with_the_same_seed_draws_new_parameters(tmp_path):
    space = write(tmp_path / "space.toml", '[params."train.lr"]\ntype = "float"\nlow = 1e-3\nhigh = 1e-1\nlog = true\n')

    def sweep(db: str) -> optuna.Study:
        opts = SweepOptions(config="", space=space, trials=2, storage=f"sqlite:///{tmp_path / db}", study="r",
                            steps=2, target=TARGET, out=str(tmp_path / f"runs-{db}"), trial_reports=False, seed=0)
        code, study = run_sweep(opts)
        assert code == 0
        return study

    sweep("a.db")
    resumed = _params(sweep("a.db"))  # the same command again: the study goes on from 2 trials
    assert len(resumed) == 4 and len(set(resumed)) == 4  # trials 2 and 3 are not trials 0 and 1 again
    assert _params(sweep("b.db")) == resumed[:2]  # a fresh study with the same seed draws the same start
