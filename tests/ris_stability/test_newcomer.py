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
