"""`risdiag sweep` and `risdiag report --sweep` in one process: space files, pruning with reasons, report."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from ris_stability.cli import main  # noqa: E402
from ris_stability.sweep.command import SweepOptions, run_sweep  # noqa: E402
from ris_stability.sweep.space import parse_space  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TARGET = f"{ROOT / 'tests' / 'ris_stability' / 'sweep_target.py'}:make_target"
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")

FAULT_SPACE = """
[params."model.fault"]
type = "categorical"
choices = ["none", "tie", "nan", "explode"]

[params."train.lr"]
type = "float"
low = 1e-3
high = 1e-1
log = true
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_SPACES = [
    ("unknown-key", '[params."train.nope"]\ntype = "float"\nlow = 0.0\nhigh = 1.0\n', "train.nope"),
    ("low-above-high", '[params."train.lr"]\ntype = "float"\nlow = 0.1\nhigh = 0.01\n', "'train.lr': low = 0.1 > high"),
    ("empty-choices", '[params."loss.eigh_backward"]\ntype = "categorical"\nchoices = []\n',
     "'loss.eigh_backward': choices must be a non-empty list"),
    ("invalid-choice", '[params."loss.eigh_backward"]\ntype = "categorical"\nchoices = ["torch", "magic"]\n',
     "loss.eigh_backward"),
    ("value-rejected-by-config", '[params."covariance.shrinkage"]\ntype = "float"\nlow = 0.0\nhigh = 1.5\n',
     "covariance.shrinkage"),
    ("log-with-zero", '[params."train.lr"]\ntype = "float"\nlow = 0.0\nhigh = 0.1\nlog = true\n', "'train.lr': log"),
    ("unknown-type", '[params."train.lr"]\ntype = "normal"\n', "'train.lr': type = 'normal'"),
    ("unknown-field", '[params."train.lr"]\ntype = "float"\nlow = 0.0\nhigh = 1.0\nmean = 3\n', "unknown field 'mean'"),
    ("no-params", "", "no parameters"),
]


@pytest.mark.parametrize("text, expected", [(t, e) for _, t, e in BAD_SPACES], ids=[i for i, _, _ in BAD_SPACES])
def test_bad_space_file_exits_2_naming_the_key(tmp_path, capsys, text, expected):
    space = write(tmp_path / "space.toml", text)
    code = main(["sweep", "--config", QUICKSTART, "--space", space, "--trials", "1", "--storage",
                 f"sqlite:///{tmp_path / 'db.sqlite'}", "--study", "bad"])
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())  # the error console wraps long lines
    assert code == 2
    assert expected in text
    assert "Traceback" not in text
    assert not (tmp_path / "db.sqlite").exists()  # nothing ran, no study was made


def test_space_suggests_every_type():
    space = parse_space({"params": {"a.x": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                    "a.n": {"type": "int", "low": 2, "high": 8, "step": 2},
                                    "a.c": {"type": "categorical", "choices": ["u", "v"]}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = [space.suggest(study.ask()) for _ in range(20)]
    assert all(1e-4 <= v["a.x"] <= 1e-2 and v["a.n"] in (2, 4, 6, 8) and v["a.c"] in ("u", "v") for v in values)
    assert {v["a.c"] for v in values} == {"u", "v"}


@pytest.fixture(scope="module")
def fault_study(tmp_path_factory):
    """One trial per planted fault of the outside-style whitening target, enqueued so each is run once."""
    tmp = tmp_path_factory.mktemp("sweep")
    storage = f"sqlite:///{tmp / 'db.sqlite'}"
    opts = SweepOptions(config="", space=write(tmp / "space.toml", FAULT_SPACE), trials=4, storage=storage,
                        study="faults", steps=8, target=TARGET, out=str(tmp / "runs"), trial_reports=False, seed=0)
    study = optuna.create_study(storage=storage, study_name="faults")
    for fault in ("none", "tie", "nan", "explode"):
        study.enqueue_trial({"model.fault": fault, "train.lr": 1e-2})
    code, study = run_sweep(opts)
    assert code == 0
    return tmp, storage, {t.params["model.fault"]: t for t in study.get_trials()}


def test_each_fault_ends_as_its_rule_says(fault_study):
    _, _, trials = fault_study
    assert len(trials) == 4
    ok = trials["none"]
    assert ok.state.name == "COMPLETE" and ok.user_attrs["status"] == "stable" and ok.user_attrs["nonfinite_steps"] == 0
    assert ok.value == pytest.approx(ok.user_attrs["val/loss"])
    expected = {"tie": ("tie", 0, "eigenvalues of model:linalg.eigh tied at"),
                "nan": ("nonfinite", 2, "1 non-finite step(s) > budget 0 (first: non-finite loss at step 2"),
                "explode": ("grad_explosion", 5, "gradient explosion: total gradient norm")}
    for fault, (rule, step, text) in expected.items():
        t = trials[fault]
        assert t.state.name == "PRUNED", fault
        assert (t.user_attrs["prune_rule"], t.user_attrs["prune_step"]) == (rule, step), fault
        assert text in t.user_attrs["prune_reason"], fault
        assert t.user_attrs["steps_run"] == step + 1, fault  # the run stopped at the verdict
        assert Path(t.user_attrs["run_dir"], "steps.jsonl").is_file()
    assert trials["tie"].user_attrs["min_gap"] == 0.0


def test_sweep_report_table_map_and_best_config(fault_study, capsys):
    tmp, storage, trials = fault_study
    out = tmp / "report" / "report.md"
    assert main(["report", "--sweep", storage, "--study", "faults", "--out", str(out)]) == 0
    text = out.read_text()
    assert "![stability map](figures/stability_map.png)" in text and (out.parent / "figures/stability_map.png").is_file()
    assert "| pruned: tie |" in text and "eigenvalues of model:linalg.eigh tied at" in text
    assert "| pruned: grad_explosion |" in text and "| stable |" in text
    assert "4 trials" not in text and "4: 1 pruned: grad_explosion, 1 pruned: nonfinite, 1 pruned: tie, 1 stable" in text
    best = (out.parent / "best.toml").read_text()
    assert f"# Best trial {trials['none'].number}" in best and 'fault = "none"' in best
    assert "Not computed: 1 completed trial" in text


def test_best_command_of_a_custom_target_reruns_the_best_trial(fault_study, tmp_path, monkeypatch, capsys):
    tmp, storage, trials = fault_study
    out = tmp / "report-best" / "report.md"
    assert main(["report", "--sweep", storage, "--study", "faults", "--out", str(out)]) == 0
    run_it = next(line for line in (out.parent / "best.toml").read_text().splitlines() if line.startswith("# run it: "))
    argv = shlex.split(run_it[len("# run it: "):])
    assert argv[:2] == ["risdiag", "sweep"] and "best-space.toml" in run_it  # not trace --config: exit 2 here
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    (rerun,) = optuna.load_study(study_name=argv[argv.index("--study") + 1],
                                 storage=argv[argv.index("--storage") + 1]).get_trials()
    assert rerun.params == trials["none"].params and rerun.value == pytest.approx(trials["none"].value)


def test_report_of_unknown_study_is_a_usage_error(fault_study, capsys):
    _, storage, _ = fault_study
    assert main(["report", "--sweep", storage, "--study", "nope"]) == 2
    assert "study 'nope' is not in the storage; it holds: faults" in " ".join(capsys.readouterr().err.split())


def test_joining_with_another_space_is_refused(fault_study, tmp_path, capsys):
    _, storage, _ = fault_study
    space = write(tmp_path / "other.toml", '[params."train.lr"]\ntype = "float"\nlow = 0.01\nhigh = 0.1\n')
    code = main(["sweep", "--config", "", "--space", space, "--trials", "1", "--storage", storage, "--study", "faults",
                 "--target", TARGET, "--out", str(tmp_path), "--steps", "8"])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "study 'faults' was created with other settings (space: study {'model.fault'" in err
    assert ";" not in err.split("(space:")[1].split(")")[0]  # the one line names only what differs: the space


@pytest.mark.parametrize("args, needle", [
    (["--storage", "nonsense://x"], "--storage 'nonsense://x': no SQLAlchemy dialect or driver for it"),
    (["--storage", "not a url"], "--storage 'not a url': not a database URL"),
    (["--storage", "sqlite:////proc/nope/x.db"], "cannot create /proc/nope"),
    (["--target", "no_such_module:f"], "--target 'no_such_module:f': cannot import"),
    (["--explode-factor", "0.5"], "must be a finite number > 1"),
    (["--workers", "0"], "must be >= 1"),
], ids=["bad-url", "not-a-url", "unwritable-sqlite", "bad-target", "explode-factor", "workers"])
def test_bad_sweep_options_exit_2(tmp_path, capsys, args, needle):
    space = write(tmp_path / "space.toml", '[params."train.lr"]\ntype = "float"\nlow = 0.001\nhigh = 0.1\n')
    base = {"--storage": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["sweep", "--config", QUICKSTART, "--space", space, "--trials", "1", "--study", "s",
            *[x for kv in base.items() for x in kv]]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejects a bad option value before any command runs
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2 and needle in " ".join((captured.out + captured.err).split())


def test_report_needs_a_run_folder_or_a_sweep(capsys):
    assert main(["report"]) == 2
    assert "risdiag report --sweep STORAGE --study NAME" in " ".join(capsys.readouterr().err.split())
