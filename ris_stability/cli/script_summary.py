"""What `risdiag trace -- python SCRIPT.py` prints at the end: the script's traceback and message, the
summary table (rank 0 lists the other ranks), and the report's path."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ris_stability.attach.finish import finish_run
from ris_stability.attach.script import ScriptRun
from ris_stability.monitor import distributed
from ris_stability.records import CAPSULE_DIR, read_summary
from ris_stability.report.markdown import shortlist


SHOWN_CAPSULES = 3  # capsule paths in the summary table; the rest as "+N more"


def rows_table(title: str, rows: list[tuple[str, str, str]]) -> Table:
    """A two-column summary table from (what, value, style) rows."""
    t = Table(title=title, show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    for what, value, style in rows:
        t.add_row(what, Text(value, style=style) if style else value)
    return t


def summary_table(run: ScriptRun) -> Table:
    w = run.watcher
    t = Table(title=f"risdiag trace: {w.meta.get('command', '')}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("status", w.status)
    t.add_row("optimizer steps", str(w.steps))
    style = "red bold" if w.nonfinite_steps else "green"
    bad = w.nonfinite_steps
    t.add_row("non-finite steps", Text(f"{len(bad)}: {shortlist(bad, 10, str(w.run_dir / 'summary.json'))}"
                                       if bad else "0", style=style))
    t.add_row("skipped steps", str(len(w.skipped_steps)))
    f = _shown_finding(run)
    if f is not None:
        rank = f" (rank {f['rank']})" if "rank" in f else ""
        t.add_row("finding" + rank, Text(f"step {f['step']}: phase {f.get('phase')}, {f.get('node') or f.get('op') or '-'} "
                                         f"in {f.get('module') or '-'} at {f.get('location') or '-'}", style="red"))
        t.add_row("cause", str(f.get("cause", "")))
        applied = (w.meta.get("options") or {}).get("gap_aware")  # a fix already applied is never recommended
        remedies = [r for r in f.get("remedies") or [] if not (applied and ("gap_aware" in r or "gap-aware" in r))]
        if remedies:
            t.add_row("remedy", str(remedies[0]))
    if w.nonfinite_steps and f is None:
        t.add_row("finding", "none: the fault did not recur in the armed steps; " + (
            f"name its op with `risdiag locate {w.run_dir}` (re-runs the script up to step {w.nonfinite_steps[0]})"
            if run.world == 1 else "replay the originating rank's capsule with `risdiag bisect CAPSULE --replayer "
            "module:function` (a replayer you write: docs/script.md)"))
    if run.world > 1 and run.rank == 0:
        for r, shard in distributed.shard_dirs(w.run_dir).items():
            summary = read_summary(shard) if r else None
            if summary is not None:
                bad = summary.get("nonfinite_steps") or []
                t.add_row(f"rank {r}", f"{summary.get('status', '?')}, {summary.get('steps', '?')} steps, "
                                       f"non-finite {len(bad)}: {shortlist(bad, 10, str(shard / 'summary.json'))}")
    capsules = _capsules(run)
    if capsules:
        more = f" (+{len(capsules) - SHOWN_CAPSULES} more)" if len(capsules) > SHOWN_CAPSULES else ""
        n = (read_summary(w.run_dir) or {}).get("capsules_dropped") or 0  # summary.json is written by now
        dropped = f"; {n} deleted by the capsule budget (the first and the most recent are kept)" if n else ""
        t.add_row("capsules", ", ".join(str(p) for p in capsules[:SHOWN_CAPSULES]) + more + dropped)
    t.add_row("run folder", str(w.run_dir))
    return t


def _capsules(run: ScriptRun) -> list[Path]:
    """This rank's capsules, then (rank 0 of a data-parallel run) every other rank's, from its shard."""
    found = list(run.watcher.monitor.capsules)
    if run.world > 1 and run.rank == 0:
        for r, shard in distributed.shard_dirs(run.watcher.run_dir).items():
            found += sorted((shard / CAPSULE_DIR).glob("*.pt")) if r else []
    return found


def report_to(run: ScriptRun, console: Console, err: Console, report: bool) -> None:
    """Print what happened (traceback, message, summary) and write report.md when the run was attached."""
    if run.traceback:
        err.print(run.traceback.rstrip(), highlight=False, markup=False, soft_wrap=True)
    if run.message:
        err.print(f"[bold]risdiag trace:[/bold] {run.message}", highlight=False, soft_wrap=True)

    def announce(missing: list[int]) -> None:
        if missing:
            err.print(f"[bold]risdiag trace:[/bold] rank(s) {missing} did not close their shard; the report "
                      "shows what they wrote", highlight=False, soft_wrap=True)
        console.print(summary_table(run))

    finish_run(run.watcher, report=report, announce=announce)
    if run.watcher.report_path is not None:
        console.print(f"report: {run.watcher.report_path}")


def _shown_finding(run: ScriptRun) -> dict | None:
    """This rank's first finding, else (rank 0 of a data-parallel run) the lowest other rank's, from its shard."""
    w = run.watcher
    if w.findings:
        step, finding = w.findings[0]
        return {**finding.to_dict(), "step": step}
    if run.world > 1 and run.rank == 0:
        from ris_stability.report.ranks import shard_finding

        return shard_finding(w.run_dir)
    return None


__all__ = ["report_to", "rows_table", "summary_table"]
