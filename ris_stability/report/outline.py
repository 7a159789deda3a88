"""The report of a run folder that recorded no step (the script crashed, or was stopped, before its first logged
step): what ran, how it ended, and its events - never a refusal of a folder that has a run_start."""
from __future__ import annotations

from pathlib import Path

from ris_stability.records import TraceError
from ris_stability.records.atomic import write_text_atomic
from ris_stability.records.reader import read_outline
from ris_stability.report import markdown as md


def outline_report(run_dir: Path, out: Path, reason: str) -> Path:
    """Write ``out`` for a run folder without step rows; TraceError when it never even started (no run_start)."""
    meta, events, summary = read_outline(run_dir)
    if not any(e["kind"] == "run_start" for e in events):
        raise TraceError(reason)
    status = (summary or {}).get("status", "incomplete (no summary.json)")
    blocks = [md.heading(f"Stability report: {md.code(Path(run_dir).name)}", 1),
              f"> **No step was recorded**: {reason}\n",
              md.heading("Run summary"),
              md.key_value_table([("status", str(status)), ("command", md.code(str(meta.get("command", "?")))),
                                  ("torch", str(meta.get("torch", "?")))]),
              md.heading("Events")]
    rows = [("" if e.get("step") is None else str(e["step"]), e["kind"], e.get("severity", ""), " ".join(str(e.get("message", "")).split()))
            for e in events]
    blocks.append(md.table(["step", "kind", "severity", "message"], rows) if rows else "none\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "\n".join(blocks) + "\n")
    return out


__all__ = ["outline_report"]
