"""What `risdiag compare` prints: the comparison's Differences table (the same rows as comparison.md), the
count of metrics the runs agree on, and where the files are."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ris_stability.records import read_trace
from ris_stability.report.compare import _labels, build_comparison, difference_rows


def default_out(runs: list[Path]) -> Path:
    """runs/compare-<a>-vs-<b> under the working directory: beside the traced runs (runs/ is where `risdiag
    trace` writes by default), never a folder of the repository's shipped reports."""
    return Path("runs") / ("compare-" + "-vs-".join(r.resolve().name for r in runs))


def compare_and_show(runs: list[Path], out: Path | None, labels: list[str] | None, console: Console) -> Path:
    path = build_comparison(runs, out or default_out(runs), labels=labels)
    names = _labels(runs, labels)
    traces = {label: read_trace(run) for label, run in zip(names, runs)}
    rows = difference_rows(traces)
    differ = [(k, v) for k, v in rows if len(set(v)) > 1]
    table = Table(title="risdiag compare: " + " vs ".join(names))
    table.add_column("metric", style="bold")
    for label in names:
        table.add_column(label, justify="right")
    for metric, values in differ:
        table.add_row(metric.replace("`", ""), *values)
    if differ:
        console.print(table)
    else:
        console.print("The runs agree on every compared metric.")
    same = len(rows) - len(differ)
    console.print(f"{len(differ)} metrics differ, {same} agree (all {len(rows)} in {path}); figures in "
                  f"{path.parent / 'figures'}", highlight=False)
    return path


__all__ = ["compare_and_show", "default_out"]
