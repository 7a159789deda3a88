"""What a newcomer sees: nothing written into the repository, tables on the terminal, help for every option,
an exit-code line in every command's help, no silently cut list."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ris_stability.cli import app as cli
from ris_stability.cli import main
from tests.ris_stability.trace_factory import make_run

ROOT = Path(__file__).resolve().parents[2]


def test_compare_writes_under_runs_of_the_cwd_and_prints_its_table(tmp_path, monkeypatch, capsys):
    a, b = make_run(tmp_path / "in" / "a"), make_run(tmp_path / "in" / "b", nonfinite_at=(3,))
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "compare-a-vs-b"
    assert (folder / "comparison.md").is_file() and not (tmp_path / "reports").exists()
    lines = " ".join(out.split())
    assert "non-finite steps" in lines and "metrics differ" in lines  # the Differences table, on the terminal
    differ = (folder / "comparison.md").read_text().split("## Differences")[1].split("<details>")[0]
    assert differ.count("\n|") - 2 == int(lines.split(" metrics differ")[0].split()[-1])  # every row shown


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"risdiag": parser, **sub.choices}


def test_every_argument_and_option_has_help():
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in _commands().items()
               for a in p._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_help_ends_with_its_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(([] if command == "risdiag" else [command]) + ["--help"])
    assert info.value.code == 0
    tail = " ".join(capsys.readouterr().out.split()).split("exit codes:")
    assert len(tail) == 2 and "0 " in tail[1] and "2 usage error" in tail[1]


def test_a_config_file_typo_names_the_file(tmp_path, capsys):
    bad = tmp_path / "typo.toml"
    bad.write_text("[train]\nlrr = 1.0\n")
    assert main(["trace", "--config", str(bad), "--no-live"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "typo.toml" in err and "train.lrr" in err and "valid keys" in err
