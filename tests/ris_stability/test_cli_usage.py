"""Every invalid argument of every `risdiag` command exits 2 with one line on stderr and no traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ris_stability.cli import app as cli
from ris_stability.monitor import MonitorConfig
from ris_stability.instruments.probe import SpectralProbe
from ris_stability.records import SettingError, UsageError
from tests.ris_stability.trace_factory import make_run

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.toml")
SWEEP = ["sweep", "--config", QUICK, "--space", "{missing}.toml", "--storage", "sqlite:///{tmp}/s.db", "--study", "s"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("usage")
    (tmp / "not.toml").write_text("this is [ not toml")
    (tmp / "garbage.pt").write_bytes(b"garbage")
    (tmp / "a_file").write_text("")
    (tmp / "empty_dir").mkdir()
    return {"tmp": str(tmp), "bad_toml": str(tmp / "not.toml"), "garbage": str(tmp / "garbage.pt"),
            "file": str(tmp / "a_file"), "dir": str(tmp / "empty_dir"),
            "clean": str(make_run(tmp / "clean")), "clean2": str(make_run(tmp / "clean2", seed=1)),
            "missing": str(tmp / "missing")}


# (arguments with {placeholders} from the `files` fixture, a word the one line must contain)
CASES = {
    "no-command": ([], "required"),
    "unknown-command": (["frobnicate"], "invalid choice"),
    "trace-no-config": (["trace"], "--config"),
    "trace-unknown-option": (["trace", "--config", QUICK, "--nope"], "unrecognized"),
    "trace-every-0": (["trace", "--config", QUICK, "--every", "0"], "--every"),
    "trace-every-negative": (["trace", "--config", QUICK, "--every", "-2"], "--every"),
    "trace-every-word": (["trace", "--config", QUICK, "--every", "often"], "--every"),
    "trace-max-matrices-0": (["trace", "--config", QUICK, "--max-matrices", "0"], "--max-matrices"),
    "trace-steps-0": (["trace", "--config", QUICK, "--steps", "0"], "--steps"),
    "trace-steps-negative": (["trace", "--config", QUICK, "--steps", "-5"], "--steps"),
    "trace-steps-float": (["trace", "--config", QUICK, "--steps", "1.5"], "--steps"),
    "trace-missing-config": (["trace", "--config", "{missing}.toml"], "does not exist"),
    "trace-config-is-dir": (["trace", "--config", "{dir}"], "does not exist"),
    "trace-config-not-toml": (["trace", "--config", "{bad_toml}"], "not valid TOML"),
    "trace-set-no-equals": (["trace", "--config", QUICK, "--set", "train.steps"], "train.steps"),
    "trace-set-unknown-key": (["trace", "--config", QUICK, "--set", "train.nope=1"], "train.nope"),
    "trace-set-bad-type": (["trace", "--config", QUICK, "--set", "train.steps=many"], "train.steps"),
    "trace-set-bad-range": (["trace", "--config", QUICK, "--set", "scene.range_m=[-1, 2]"], "scene.range_m"),
    "trace-out-is-file": (["trace", "--config", QUICK, "--out", "{file}"], "--out"),
    "trace-out-unwritable": (["trace", "--config", QUICK, "--out", "/proc/forbidden/run"], "--out"),
    "bisect-no-target": (["bisect"], "target"),
    "bisect-missing": (["bisect", "{missing}.pt"], "does not exist"),
    "bisect-corrupt": (["bisect", "{garbage}"], "corrupted"),
    "bisect-not-a-run": (["bisect", "{dir}"], "run folder"),
    "bisect-clean-run": (["bisect", "{clean}"], "nothing to bisect"),
    "bisect-export-is-file": (["bisect", "{garbage}", "--export", "{file}"], "--export"),
    "bisect-export-unwritable": (["bisect", "{garbage}", "--export", "/proc/forbidden/x"], "--export"),
    "report-missing": (["report", "{missing}"], "run folder"),
    "report-not-a-run": (["report", "{dir}"], "run folder"),
    "report-out-unwritable": (["report", "{clean}", "--out", "/proc/forbidden/r.md"], "--out"),
    "compare-one-run": (["compare", "{clean}", "--out", "{tmp}/cmp1"], "2 to"),
    "compare-missing-run": (["compare", "{clean}", "{missing}", "--out", "{tmp}/cmp2"], "run folder"),
    "compare-label-count": (["compare", "{clean}", "{clean2}", "--labels", "a", "--out", "{tmp}/cmp3"], "labels"),
    "compare-same-labels": (["compare", "{clean}", "{clean2}", "--labels", "a", "a", "--out", "{tmp}/cmp4"],
                            "distinct"),
    "compare-out-is-file": (["compare", "{clean}", "{clean2}", "--out", "{file}"], "{file}"),
    "report-nothing": (["report"], "run folder"),
    "trace-replayer-with-config": (["trace", "--config", QUICK, "--replayer", "x:y"], "--replayer"),
    "sweep-trials-0": ([*SWEEP, "--trials", "0"], "--trials"),
    "sweep-workers-0": ([*SWEEP, "--trials", "2", "--workers", "0"], "--workers"),
    "sweep-seed-negative": ([*SWEEP, "--trials", "2", "--seed", "-1"], "--seed"),
    "sweep-explode-factor": ([*SWEEP, "--trials", "2", "--explode-factor", "0.5"], "--explode-factor"),
    "sweep-direction": ([*SWEEP, "--trials", "2", "--direction", "sideways"], "--direction"),
    "sweep-missing-space": ([*SWEEP, "--trials", "2"], "does not exist"),
    "sweep-no-storage": (["sweep", "--config", QUICK, "--space", "x.toml", "--trials", "2", "--study", "s"],
                         "--storage"),
    "align-no-config": (["align"], "--config"),
    "align-missing-config": (["align", "--config", "{missing}.toml"], "does not exist"),
    "align-set-unknown-key": (["align", "--config", QUICK, "--set", "loss.nope=1"], "loss.nope"),
}


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_argument_exits_2_with_one_line(case, files, capsys):
    args, needle = CASES[case]
    code, err = run_main([a.format(**files) for a in args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (case, code, err)
    assert len(lines) == 1, (case, err)
    assert needle.format(**files) in lines[0] and "Traceback" not in err, (case, err)


def test_every_integer_option_is_validated_at_parse_time():
    """Options added later must use a validating type (cli.positive_int, cli.nonnegative_int ...), not int."""
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    unchecked = [f"{name} {'/'.join(action.option_strings) or action.dest}"
                 for name, sub in subparsers.choices.items() for action in sub._actions
                 if action.type in (int, float)]
    assert unchecked == []


def test_config_object_settings_are_usage_errors():
    """A bad setting of a config object is a ValueError for API callers and a usage error for the CLI."""
    for make in (lambda: MonitorConfig(every=0), lambda: MonitorConfig(max_matrices=0),
                 lambda: MonitorConfig(grad_depth=0), lambda: SpectralProbe(every=0)):
        with pytest.raises(SettingError) as info:
            make()
        assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)


def test_setting_error_raised_inside_a_command_exits_2(monkeypatch, capsys):
    """Options that reach a config object without a parse-time check still exit 2 with one line."""
    monkeypatch.setitem(cli.COMMANDS, "report", lambda args, console: MonitorConfig(every=0) and 0)
    code, err = run_main(["report", "anything"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "MonitorConfig" in err


def test_one_line_in_a_real_process_with_logging(tmp_path):
    """In a subprocess nothing else (log records, rich wrapping of long paths) adds lines to stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "40"}
    long_path = tmp_path / ("very-long-folder-name-" * 4) / "capsule.pt"
    for args in (["trace", "--config", QUICK, "--every", "0"], ["bisect", str(long_path)]):
        run = subprocess.run([sys.executable, "-m", "ris_stability.cli", *args], capture_output=True, text=True,
                             timeout=120, env=env, cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
