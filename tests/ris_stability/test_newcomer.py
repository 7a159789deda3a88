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


def _audit(grad_error: float):
    from ris_stability.instruments.precision import PrecisionAudit, SiteAudit

    site = SiteAudit(site="loss.subspace:linalg.eigvalsh", op="linalg.eigvalsh", module="loss.subspace",
                     location="x.py:1", dtype="complex64", calls=1, grad_error=grad_error, promoted_error=1e-7)
    return PrecisionAudit(tolerance=1e-3, baseline_error=1e-6, all_sites_error=2e-8, grad_norm=1.0,
                          reference_norm=1.0, parameters={"w": 1e-6}, sites=(site,),
                          cause="no op's precision changes the gradient beyond the tolerance; end-of-line-marker")


def test_precision_panel_wraps_when_piped_and_says_not_compared_for_nan(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from ris_stability.replay import bisect

    monkeypatch.setattr(bisect, "audit_capsule", lambda path, replayer: _audit(float("nan")))
    out = io.StringIO()
    console = Console(file=out, width=80, soft_wrap=True)  # what main() builds when stdout is a pipe
    assert bisect.run_precision(str(tmp_path / "step_000001.pt"), as_json=False, console=console) == 0
    text = " ".join(out.getvalue().replace("│", " ").split())
    assert "all linalg sites in float64: 2.00e-08" in text and "end-of-line-marker" in text  # wrapped, not cropped
    assert "nan" not in text and "not compared" in text


def test_summary_rows_say_how_many_more_and_where(tmp_path):
    from types import SimpleNamespace

    from ris_stability.integrations.ris import _summary_rows

    run = tmp_path / "run"
    monitor = SimpleNamespace(_losses=[2.0, 1.0], nonfinite_steps=list(range(30)), skipped_steps=list(range(30)),
                              capsules=[run / "capsules" / f"step_{i:06d}.pt" for i in range(5)])
    rows = {what: value for what, value, _ in _summary_rows(SimpleNamespace(train=SimpleNamespace(steps=30)),
                                                          SimpleNamespace(monitor=monitor, run_dir=run), None, 1.0)}
    assert rows["non-finite steps"].startswith("30: 0, 1,") and f"(+20 more; all in {run / 'summary.json'})" in \
        rows["non-finite steps"]
    assert rows["capsules"].startswith(f"5 in {run / 'capsules'}: step_000000.pt") and "(+1 more" in rows["capsules"]
