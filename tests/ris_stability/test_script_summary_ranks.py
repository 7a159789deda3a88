"""The console summary of a data-parallel script run lists the capsules of every rank (rank 0 reads the
other ranks' shards), the first few by path and the rest as "+N more"."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ris_stability.cli.script_summary import SHOWN_CAPSULES, _capsules, summary_table


def _run(tmp: Path, own: int, others: dict[int, int]) -> SimpleNamespace:
    mine = [tmp / "capsules" / f"step_{i:06d}.pt" for i in range(own)]
    for rank, n in others.items():
        folder = tmp / f"rank{rank}" / "capsules"
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"step_{i:06d}.pt").write_bytes(b"")
    watcher = SimpleNamespace(monitor=SimpleNamespace(capsules=mine), run_dir=tmp)
    return SimpleNamespace(watcher=watcher, world=1 + len(others), rank=0)


def test_rank0_lists_every_ranks_capsules(tmp_path):
    run = _run(tmp_path, 1, {1: 2, 2: 1})
    found = _capsules(run)
    assert found[0] == tmp_path / "capsules" / "step_000000.pt"
    assert sorted(p.parent.parent.name for p in found[1:]) == ["rank1", "rank1", "rank2"]


def test_summary_shows_the_first_capsules_and_how_many_more(tmp_path):
    from rich.console import Console

    run = _run(tmp_path, 2, {1: 3})
    w = run.watcher
    w.status, w.steps, w.nonfinite_steps, w.skipped_steps, w.findings, w.meta = "nonfinite", 5, [1], [1], [], {}
    console = Console(width=400, record=True)
    console.print(summary_table(run))
    text = console.export_text()
    assert f"(+{5 - SHOWN_CAPSULES} more)" in text
