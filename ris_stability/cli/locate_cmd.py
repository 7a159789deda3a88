"""`risdiag locate RUN_DIR`: re-run a traced script's recorded command up to its first non-finite step with
the locator armed there, and add the finding (or where the re-run diverged) to the run folder and its report.

Exit codes: 0 located; 2 usage (not a script run, no bad step); 3 the re-run diverged from the record or
came out finite (the message says at which step and what to do).
"""
from __future__ import annotations

import argparse
import json
import math

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

EXIT_OK, EXIT_NOT_REPRODUCED = 0, 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("locate", help="name the op of a traced script's first non-finite step by re-running its "
                       "recorded command up to that step (no replayer needed)")
    p.add_argument("run_dir", help="the run folder of `risdiag trace -- python SCRIPT.py`")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.add_argument("--no-report", action="store_true", help="do not rebuild report.md")


def run(args: argparse.Namespace, console: Console) -> int:
    from ris_stability.replay.rerun import divergence_message, record, recorded, rerun

    rec = recorded(args.run_dir)
    console.print(f"re-running [bold]{rec.command.text}[/bold] (in {rec.cwd}) up to step {rec.step}"
                  + (" under gap_aware()" if rec.gap_aware else ""), highlight=False)
    result = rerun(rec)
    record(rec, result)
    report = None
    if not args.no_report:
        from ris_stability.report.build import build_report

        report = build_report(rec.run_dir)
    if args.json:
        f = result.finding.to_dict() if result.located else None
        console.print_json(json.dumps({"run_dir": str(rec.run_dir), **result.to_dict(), "finding": f,
                                       "message": "" if result.located else divergence_message(rec, result)},
                                      default=str))
    elif result.located:
        console.print(_panel(rec, result), highlight=False)
    else:
        console.print(f"[yellow bold]risdiag locate: not reproduced:[/yellow bold] {divergence_message(rec, result)}",
                      highlight=False, soft_wrap=True)
    if report is not None:
        console.print(f"report: {report}")
    return EXIT_OK if result.located else EXIT_NOT_REPRODUCED


def _panel(rec, result) -> Panel:
    f = result.finding
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    check = {None: "no capsule to compare with", True: "equal to the capsule's", False: "DIFFERENT from the capsule's"}
    t.add_row("step", f"{rec.step} (reached after {rec.step} plain steps)")
    t.add_row("parameters", check[result.params_match])
    t.add_row("gradients", {None: "no capsule gradients to compare with", True: "bit-exact with the capsule's",
                            False: "NOT bit-exact: " + "; ".join(result.grad_differences[:3])}[result.grads_bit_exact])
    for name in ("phase", "op", "node", "module", "location", "cause"):
        value = getattr(f, name)
        if value:
            t.add_row(name, str(value))
    for s in f.inputs[:3]:
        t.add_row("input", f"{s.name} {list(s.shape)} {s.dtype}, |max| {s.absmax}, nan {s.nan}, inf {s.inf}"
                  + (f", min gap {s.spectral.get('min_gap', math.nan):.2e}" if s.spectral else ""))
    # a fix the run already applied (--gap-aware) is never recommended again
    remedies = [r for r in f.remedies if not (rec.gap_aware and ("gap_aware" in r or "gap-aware" in r))]
    for i, r in enumerate(remedies):
        t.add_row("remedy" if i == 0 else "", f"- {r}")
    t.add_row("written", f"{rec.run_dir}/finding.json, events.jsonl")
    return Panel(t, title=f"risdiag locate {rec.run_dir.name}", border_style="red")
