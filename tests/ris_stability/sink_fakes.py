"""Shared pieces of the sink tests: a small traced run, a folder with what exists only at the end, and the
tools' modules imported once (a mutation run forks each test from an interpreter that already holds them)."""

from __future__ import annotations

from pathlib import Path

try:
    import mlflow.entities  # noqa: F401
    import mlflow.tracking  # noqa: F401
except ImportError:
    mlflow = None
try:
    import PIL.Image  # noqa: F401
    import tensorboard  # noqa: F401
    import torch.utils.tensorboard as tbmod
except ImportError:
    tbmod = None

from ris_stability.records import TraceWriter

EVENTS = [  # (kind, severity, step)
    ("nonfinite_loss", "error", 3), ("gradient_spike", "warning", 4), ("run_start", "info", None),
    ("finding", "info", 5), ("precision_audit", "info", 6), ("capsule_written", "info", 7),
]


def run_folder(out: Path, status: str = "clean", events=EVENTS, steps: int = 3, extra=None) -> None:
    """A traced run: ``steps`` rows, the events, a summary with ``status``."""
    with TraceWriter(out, {"command": "risdiag trace x"}) as writer:
        for step in range(steps):
            writer.step({"step": step, "loss": 1.0 + step, "grad/_total": 2.0, "note": "text", **(extra or {})})
        for kind, severity, step in events:
            writer.event(kind, severity, f"{kind} message", step=step)
        writer.summary({"steps": steps, "status": status})


def publishable(run_dir: Path) -> None:
    """A run folder with what exists only at the end: a report, two figures, a capsule."""
    import numpy as np
    from PIL import Image

    (run_dir / "report.md").write_text("# the report\n")
    (run_dir / "figures").mkdir()
    for name in ("b_loss", "a_grad"):
        Image.fromarray(np.zeros((3, 5, 3), dtype=np.uint8)).save(run_dir / "figures" / f"{name}.png")
    (run_dir / "capsules").mkdir()
    (run_dir / "capsules" / "step_3.pt").write_bytes(b"x")
