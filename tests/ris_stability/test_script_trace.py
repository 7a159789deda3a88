"""`risdiag trace -- python SCRIPT.py`: unmodified outside-style scripts (tests/ris_stability/scripts/) with
planted faults, traced in-process through cli.main; their finding, skip policy, exit codes and messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ris_stability import cli
from ris_stability.records import read_trace

SCRIPTS = Path(__file__).parent / "scripts"
REPO = Path(__file__).resolve().parents[2]
FAULT_STEP = 5


def fault_line(script: str) -> int:
    lines = (SCRIPTS / script).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if "# FAULT" in line)


def trace(tmp_path: Path, *argv: str, options: tuple[str, ...] = ("--no-report",)) -> tuple[int, Path]:
    run_dir = tmp_path / "run"
    code = cli.main(["trace", "--out", str(run_dir), *options, "--", "python", *argv])
    return code, run_dir


CASES = [  # script, autograd node of the origin, module path of the culprit, cause key words
    ("sqrt_rows.py", "SqrtBackward0", "model.encoder.blocks.1.norm", "sqrt backward at 0"),
    ("eigh_whiten.py", "LinalgEighBackward0", "model.features.1", "tied eigenvalues"),
    ("svd_polar.py", "LinalgSvdBackward0", "model.mix", "svd backward"),
]


@pytest.mark.parametrize("script,node,module,cause", CASES, ids=[c[0] for c in CASES])
def test_planted_fault_is_located_and_skipped(tmp_path, script, node, module, cause):
    saved = tmp_path / "final.pt"
    code, run_dir = trace(tmp_path, str(SCRIPTS / script), "--steps", "12", "--save", str(saved))
    assert code == cli.EXIT_NONFINITE
    t = read_trace(run_dir)
    assert t.nonfinite_steps[0] == FAULT_STEP  # the steps before the fault are clean
    assert not t.steps.loc[: FAULT_STEP - 1, "nonfinite"].astype(bool).any()
    assert t.skipped_steps == list(range(FAULT_STEP, 12))
    finding = json.loads((run_dir / "finding.json").read_text())
    assert (finding["phase"], finding["node"], finding["module"]) == ("backward", node, module)
    assert finding["location"].endswith(f"scripts/{script}:{fault_line(script)}")
    assert cause in finding["cause"] and finding["remedies"]
    events = [e for e in t.events if e["kind"] == "finding"]
    assert events and events[0]["data"]["finding"]["node"] == node
    assert events[0]["data"]["first_nonfinite_step"] == FAULT_STEP
    state = torch.load(saved, weights_only=True)  # skip kept every update finite
    assert all(bool(torch.isfinite(v).all()) for v in state.values())


def test_report_shows_the_finding(tmp_path):
    code, run_dir = trace(tmp_path, str(SCRIPTS / "sqrt_rows.py"), "--steps", "8", options=())
    assert code == cli.EXIT_NONFINITE
    report = (run_dir / "report.md").read_text()
    assert "SqrtBackward0" in report and "model.encoder.blocks.1.norm" in report
    assert f"sqrt_rows.py:{fault_line('sqrt_rows.py')}" in report


def test_clean_run_exits_zero(tmp_path):
    code, run_dir = trace(tmp_path, str(SCRIPTS / "sqrt_rows.py"), "--steps", "4")
    assert code == cli.EXIT_OK
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "clean"
    assert not (run_dir / "finding.json").exists()


def test_stop_policy_ends_the_run_after_locating(tmp_path):
    code, run_dir = trace(tmp_path, str(SCRIPTS / "sqrt_rows.py"), "--steps", "12",
                          options=("--no-report", "--on-nonfinite", "stop"))
    assert code == cli.EXIT_NONFINITE
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] == FAULT_STEP + 2
    assert json.loads((run_dir / "finding.json").read_text())["node"] == "SqrtBackward0"


def test_script_that_raises(tmp_path, capsys):
    code, run_dir = trace(tmp_path, str(SCRIPTS / "raises.py"))
    assert code == 4
    err = capsys.readouterr().err
    assert "raises.py" in err and "RuntimeError" in err and "mat1 and mat2 shapes" in err
    assert "cli.py" not in err and "runpy" not in err  # the script's traceback, not ours
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "crashed" and summary["steps"] == 2


BAD = [  # id, argv after 'trace', words the one-line message must hold
    ("missing-script", ["--", "python", "no/such/script.py"], "not found"),
    ("syntax-error", ["--", "python", str(SCRIPTS / "syntax_error.py")], "syntax_error.py:3: syntax error"),
    ("missing-module", ["--", "python", "-m", "no_such_module_xyz"], "no module named"),
    ("python-option", ["--", "python", "-X", "dev", "x.py"], "not supported"),
    ("nothing-after-dashes", ["--"], "nothing to run"),
    ("neither-form", [], "--config"),
    ("steps-with-script", ["--steps", "3", "--", "python", "x.py"], "--steps"),
    ("policy-with-config", ["--config", str(REPO / "configs" / "quickstart.toml"), "--on-nonfinite", "stop"],
     "--on-nonfinite"),
]


@pytest.mark.parametrize("argv,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, argv, words):
    assert cli.main(["trace", "--out", str(tmp_path / "run"), *argv]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert words.lower() in err.lower() and "Traceback" not in err
    assert not (tmp_path / "run" / "meta.json").exists()


def test_script_that_never_steps_an_optimizer(tmp_path, capsys):
    code, run_dir = trace(tmp_path, str(SCRIPTS / "never_steps.py"))
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "never called optimizer.step()" in err and "3 backward calls" in err and "Traceback" not in err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "no_steps"


def test_module_form_in_a_real_process(tmp_path):
    """`python -m` form, through the installed entry point's code path in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "ris_stability.cli", "trace", "--out", str(tmp_path / "run"), "--no-report", "--",
           "python", "-m", "scripts.sqrt_rows", "--steps", "7"]
    proc = subprocess.run(cmd, cwd=SCRIPTS.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == cli.EXIT_NONFINITE, proc.stderr
    assert "SqrtBackward0" in proc.stdout + proc.stderr
    assert "trained 7 steps" in proc.stdout
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["script_kind"] == "module" and meta["script"] == "scripts.sqrt_rows"


def test_example_replays_with_its_replayer(tmp_path, capsys):
    """The README's worked example: trace examples/planted_fault.py, then bisect its first capsule."""
    example = REPO / "examples" / "planted_fault.py"
    code, run_dir = trace(tmp_path, str(example), "--steps", "10")
    assert code == cli.EXIT_NONFINITE
    capsule = run_dir / "capsules" / "step_000008.pt"
    assert cli.main(["bisect", str(capsule)]) == cli.EXIT_USAGE  # a script's capsule names no replayer
    assert "--replayer" in capsys.readouterr().err
    assert cli.main(["bisect", str(capsule), "--json", "--replayer", f"{example}:replay"]) == cli.EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["reproduced"] and result["bit_exact"]
    assert result["finding"]["node"] == "LinalgEighBackward0" and result["finding"]["module"] == "model.features.1"
