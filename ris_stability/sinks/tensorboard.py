"""TensorBoard sink: scalars per logged step, incidents and findings as text, report figures as images.

Each run folder becomes one TensorBoard run, ``DIR/<run folder name>``, so ``tensorboard --logdir DIR``
compares runs side by side. Needs the ``tensorboard`` package (extra ``ris-diag[tensorboard]``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

from ris_stability.sinks.base import markdown_event

# Event kinds written as "findings" text; every other warning or error is an "incident".
_FINDING_KINDS = ("finding", "precision_audit")


class TensorBoardRun:
    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))

    def step(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def event(self, record: Mapping[str, Any]) -> None:
        kind = record.get("kind")
        if kind in _FINDING_KINDS:
            tag = "findings"
        elif record.get("severity") in ("warning", "error"):
            tag = "incidents"
        else:
            return
        self.writer.add_text(tag, markdown_event(record), global_step=record.get("step") or 0)

    def publish(self, run_dir: Path) -> None:
        report = run_dir / "report.md"
        if report.is_file():
            self.writer.add_text("report", report.read_text(encoding="utf-8"))
        figures = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").is_dir() else []
        if figures:
            import numpy as np
            from PIL import Image

            for png in figures:
                with Image.open(png) as im:
                    pixels = np.asarray(im.convert("RGB"))
                self.writer.add_image(f"figures/{png.stem}", pixels, dataformats="HWC")
        capsules = sorted((run_dir / "capsules").glob("*.pt")) if (run_dir / "capsules").is_dir() else []
        if capsules:
            self.writer.add_text("capsules", "\n".join(f"- `{run_dir.name}/capsules/{c.name}`" for c in capsules))

    def close(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class TensorBoardBackend:
    name = "tensorboard"

    def __init__(self, logdir: Path):
        self.logdir = Path(logdir)

    def check(self) -> None:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError as exc:
            raise ImportError("the tensorboard package is not installed: pip install 'ris-diag[tensorboard]'") from exc
        self.logdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.logdir, prefix=".risdiag-write-test"):
            pass  # an unwritable folder fails here, at start, not at the first step

    def open_run(self, run_dir: Path, meta: Mapping[str, Any]) -> TensorBoardRun:
        run = TensorBoardRun(self.logdir / run_dir.name)
        command = meta.get("command")
        if command:
            run.writer.add_text("command", f"`{command}`")
        return run


__all__ = ["TensorBoardBackend", "TensorBoardRun"]
