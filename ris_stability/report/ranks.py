"""The report's per-rank section for a data-parallel run: one row per rank (from its trace shard) and,
for the steps where the ranks differ (a rank's local loss or gradients non-finite before the all-reduce),
one column per rank. ``with_shards`` gives rank 0's trace the other shards' capsules and, when rank 0 has
none, the originating rank's finding: under DDP only that rank's locator saw the fault happen."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ris_stability.records import list_capsules, read_finding, read_trace
from ris_stability.records.reader import Trace
from ris_stability.records.shards import shard_dirs
from ris_stability.report import markdown as md

LOCAL_NONFINITE, LOCAL_NORM = "local/nonfinite", "local/grad_norm"
MAX_STEP_ROWS = 20


def _col(trace: Trace, name: str) -> dict[int, float]:
    if name not in trace.steps.columns:
        return {}
    return {int(k): float(v) for k, v in trace.steps[name].items()}


def _rank_row(r: int, trace: Trace) -> tuple:
    bad = sorted(s for s, v in _col(trace, LOCAL_NONFINITE).items() if v == 1.0)
    losses = [v for v in _col(trace, "loss").values() if math.isfinite(v)]
    norms = sorted(v for v in _col(trace, LOCAL_NORM).values() if math.isfinite(v))
    status = (trace.summary or {}).get("status", "incomplete (no summary.json)")
    return (md.fmt(r), md.fmt(len(trace.steps)), f"{len(bad)} {bad[:10]}" if bad else "0",
            md.fmt(losses[-1]) if losses else "n/a", md.fmt(norms[len(norms) // 2]) if norms else "n/a", status)


def _step_rows(traces: dict[int, Trace]) -> list[tuple]:
    flags = {r: _col(t, LOCAL_NONFINITE) for r, t in traces.items()}
    steps = sorted({s for f in flags.values() for s, v in f.items() if v == 1.0})
    cols = {r: (_col(t, "loss"), _col(t, LOCAL_NORM)) for r, t in traces.items()}
    rows = []
    for s in steps[:MAX_STEP_ROWS]:
        origins = [r for r in traces if flags[r].get(s) == 1.0]
        cells = [f"{md.fmt(cols[r][0].get(s, math.nan))} / {md.fmt(cols[r][1].get(s, math.nan))}" for r in traces]
        rows.append((md.fmt(s), ", ".join(map(str, origins)), *cells))
    return rows


def ranks_blocks(run_dir: Path) -> list[str]:
    """Markdown blocks of the per-rank section; [] for a one-process run."""
    shards = shard_dirs(run_dir)
    if len(shards) < 2:
        return []
    traces = {r: read_trace(d) for r, d in shards.items()}
    if traces[0].meta.get("process_group") is False:
        intro = ("The launcher started these ranks, but they joined no process group: each trained alone, so each "
                 "row is a run of its own, with its own non-finite steps and skip decisions (see `status`).\n")
    else:
        intro = ("Each rank's own view before the gradient all-reduce: `local non-finite` counts the steps whose "
                 "local loss or local gradients were non-finite on that rank (it originated the fault); the skip "
                 "decision itself is collective, so every rank skipped the same steps.\n")
    blocks = [md.heading("Ranks (data-parallel)"), intro,
              md.table(["rank", "steps", "local non-finite steps", "last finite loss", "median local grad norm",
                        "status"], [_rank_row(r, t) for r, t in traces.items()], "rrlrrl")]
    rows = _step_rows(traces)
    if rows:
        blocks += ["Steps where the ranks differ (loss / local gradient norm before the all-reduce):\n",
                   md.table(["step", "originating rank(s)", *(f"rank {r}" for r in traces)], rows)]
    return blocks


def with_shards(trace: Trace) -> Trace:
    """Rank 0's trace with every shard's capsules, and the finding of the lowest rank that has one when
    rank 0 has none (tagged with its ``rank``); a one-process trace is returned as it is."""
    shards = shard_dirs(trace.run_dir)
    if len(shards) < 2:
        return trace
    capsules = [p for r, d in shards.items() for p in (trace.capsules if r == 0 else list_capsules(d))]
    return dataclasses.replace(trace, capsules=capsules, finding=trace.finding or shard_finding(trace.run_dir))


def shard_finding(run_dir: Path) -> dict | None:
    """The finding.json of the lowest rank > 0 that has one, tagged with its ``rank`` (under DDP only an
    originating rank keeps a finding); None when no other rank has one."""
    for r, shard in shard_dirs(run_dir).items():
        found = read_finding(shard) if r else None
        if found:
            return {**found, "rank": r}
    return None
