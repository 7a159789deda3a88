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


def _readme() -> str:
    return " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())


def test_readme_tensorboard_tags_are_the_ones_written(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.ris_stability.test_sinks import _train

    text = _readme().split("writes one TensorBoard run per run folder")[1].split("incidents and findings")[0]
    documented = re.findall(r"`([a-z_]+)/<?([a-z]*)>?", text)  # (prefix, placeholder)
    assert {p for p, _ in documented} >= {"loss", "grad_norm", "update_ratio", "train", "matrix"}, documented
    _train(tmp_path / "run", steps=3, tensorboard=tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for prefix, placeholder in documented:
        found = [t for t in tags if t.startswith(prefix + "/")]
        assert found, (prefix, tags)
        if placeholder == "module":  # a module of the model, as grad_norm/<module>: not a param-group index
            assert {t.split("/", 1)[1] for t in found} <= {"proj", "total"}, found
    for stat in re.findall(r"\b(rank|log10_cond|min_gap|max_cluster)\b", text):
        assert any(t.startswith("matrix/") and t.endswith("/" + stat) for t in tags), stat


def test_readme_run_folder_files_exist_after_a_short_quickstart(tmp_path):
    run = tmp_path / "q"
    code = main(["trace", "--config", str(ROOT / "configs" / "quickstart.toml"), "--steps", "2", "--no-live",
                 "--out", str(run), "--set", "data.batch_size=4", "--set", "train.val_every=0",
                 "--set", "data.n_val=0"])
    assert code == 0
    sentence = _readme().split("the run folder, `runs/quickstart-<time>/`, which holds")[1].split("Exit code")[0]
    import re

    names = re.findall(r"`([a-z_.]+(?:/|\.toml|\.jsonl|\.json|\.md)|figures/\*\.png)`", sentence)
    assert {"config.resolved.toml", "steps.jsonl", "events.jsonl", "summary.json", "report.md"} <= set(names)
    for name in names:
        if name in ("capsules/", "snapshots/"):  # only when a step went non-finite / spiked
            continue
        found = list(run.glob(name.rstrip("/"))) if "*" in name else [run / name.rstrip("/")]
        assert found and all(p.exists() for p in found), name


@pytest.mark.slow
def test_readme_bisector_quotes_are_what_bisect_prints(tmp_path, capsys):
    """The README's seed-nan paragraph, quote by quote, against `risdiag bisect` of seed-nan's first step."""
    import json
    import re

    out = tmp_path / "seed-nan"
    code = main(["trace", "--config", str(ROOT / "configs" / "seed-nan.toml"), "--steps", "2", "--no-live",
                 "--no-report", "--out", str(out), "--set", "train.val_every=0", "--set", "data.n_val=0"])
    if code == 0:
        pytest.skip("this LAPACK returned no bit-equal tie in seed-nan's first steps: no NaN to bisect")
    capsys.readouterr()
    assert main(["bisect", str(out), "--json", "--float64"]) == 0
    finding = json.loads(capsys.readouterr().out)["finding"]
    printed = " ".join(" ".join([finding["cause"], *finding["remedies"]]).split())
    paragraph = _readme().split("On `seed-nan` the bisector reports:")[1].split("(Printed on")[0]
    for code_span in ("LinalgEighBackward0", "aten.div_.Tensor", "loss.subspace", "ris_model/loss.py:99"):
        assert f"`{code_span}`" in paragraph
    assert finding["node"] == "LinalgEighBackward0" and finding["op"] == "aten.div_.Tensor"
    assert finding["module"] == "loss.subspace" and finding["location"] == "ris_model/loss.py:99"
    quotes = [part.strip() for q in re.findall(r'"([^"]+)"', paragraph) for part in q.split("...")]
    assert len(quotes) >= 4, quotes
    for quote in quotes:
        if "share" in quote:  # a float32 rounding residue: its digits follow the CPU, its size does not
            pattern = re.escape(quote).replace(re.escape(re.search(r"share (\S+) of", quote)[1]), r"(\S+)")
            assert float(re.search(pattern, printed)[1]) < 1e-5, quote
        else:
            assert quote in printed, quote


@pytest.mark.parametrize("flip", [False, True], ids=["slice", "slice-then-flip"])
def test_eigenvector_use_of_a_custom_eigh_is_read_where_the_vectors_are_consumed(flip):
    """The subspace term of ris_model takes vecs[..., -k:].flip(-1) of eigh_gap_aware: its vectors do
    receive gradient, whatever happens to the Python object made inside the autograd Function's forward."""
    import torch
    from torch import nn

    from ris_stability.instruments.probe import SpectralProbe
    from ris_stability.spectral import eigh_gap_aware

    class Subspace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 8)

        def forward(self, x):
            y = self.lin(x)
            z = torch.complex(y[:, :4], y[:, 4:])
            _, vecs = eigh_gap_aware(z.mH @ z + torch.eye(4))
            top = vecs[..., -2:].flip(-1) if flip else vecs[..., -2:]
            return top.abs().pow(2)[..., 0, :].sum()

    torch.manual_seed(0)
    model = Subspace()
    with SpectralProbe(roots={"model": model}) as probe:
        model(torch.randn(8, 4)).backward()
        sites = probe.collect()
    assert {name: site["vec_grad"] for name, site in sites.items()} == {"model:eigh_gap_aware": True}


@pytest.mark.parametrize("singular, drawn, recorded", [(True, True, True), (True, True, False), (False, False, True)],
                         ids=["rank-deficient", "rank-deficient-older-trace", "full-rank"])
def test_cond_figure_shows_the_range_separation_of_a_rank_deficient_matrix(singular, drawn, recorded):
    import math

    import numpy as np
    import pandas as pd

    from ris_stability.report import plots

    site = "mat/m:linalg.eigh/"
    frame = pd.DataFrame({f"{site}log10_cond": math.inf if singular else 3.0, f"{site}rank": 16.0 if singular else 144.0,
                          f"{site}n": 144.0, f"{site}lambda_max": 1.0, f"{site}gap_split": 1e-2},
                         index=pd.Index(range(40), name="step"))
    if recorded:  # the range condition itself (lambda_max / smallest eigenvalue above the rank tolerance)
        frame[f"{site}range_log10_cond"] = 2.5
    fig = plots.plot_log10_cond(frame, eps=1.2e-7, precision="float32")
    ys = [line.get_ydata() for line in fig.axes[0].get_lines() if len(line.get_ydata()) == 40]
    # recorded: 2.5; an older trace without it: log10(lambda_max / gap_split) = log10(1 / 1e-2)
    assert any(np.allclose(y, 2.5 if recorded else 2.0) for y in ys) == drawn
    labels = " ".join(t.get_text() for t in fig.legends[0].get_texts()) if fig.legends else ""
    assert ("cond of its range" in labels) == drawn
    assert ("signal/noise" in labels) == (drawn and not recorded)


@pytest.mark.parametrize("n, trend", [(100, True), (10, False)], ids=["long-run", "short-run"])
def test_loss_figure_draws_a_trend_over_the_raw_curve(n, trend):
    import numpy as np
    import pandas as pd

    from ris_stability.report import plots

    rng = np.random.default_rng(0)
    loss = 2.0 - np.linspace(0, 1, n) + 0.3 * rng.standard_normal(n)
    fig = plots.plot_loss_terms(pd.DataFrame({"loss": loss}, index=pd.Index(range(n), name="step")))
    lines = [line for line in fig.axes[0].get_lines() if len(line.get_ydata()) >= n // 2]
    faint = [line for line in lines if (line.get_alpha() or 1.0) < 0.5]
    assert bool(faint) == trend
    if trend:
        (bold,) = [line for line in lines if line not in faint]
        assert np.nanstd(np.diff(bold.get_ydata())) < 0.3 * np.nanstd(np.diff(faint[0].get_ydata()))


def test_gap_figure_legend_names_a_series_hidden_under_an_identical_one():
    import numpy as np
    import pandas as pd

    from ris_stability.report import plots

    gaps = np.geomspace(1e-3, 1e-2, 20)
    frame = pd.DataFrame({f"mat/{site}/{stat}": gaps for site in ("a:linalg.eigvalsh", "a:linalg.eigh", "b:linalg.eigh")
                          for stat in ("gap_split", "min_gap_noise")}, index=pd.Index(range(20), name="step"))
    frame["mat/b:linalg.eigh/gap_split"] = gaps * 2
    labels = [t.get_text() for t in plots.plot_gaps(frame).legends[0].get_texts()]
    (twin,) = [label for label in labels if "same values as" in label]  # b differs: not named
    assert "a:linalg.eigh" in twin and "a:linalg.eigvalsh" in twin and "b:" not in twin
