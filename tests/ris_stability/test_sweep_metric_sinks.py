"""``report_metric`` outside a sweep: its values reach the command's sinks as ``val/NAME`` at the run's
current step (the pipeline's validations go the same way), and with no sink it does nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from ris_stability.records import TraceWriter
from ris_stability.sinks import open_sinks
from ris_stability import report_metric


def test_report_metric_reaches_tensorboard_as_val_name(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open_sinks(tensorboard=tmp_path / "tb"):
        with TraceWriter(tmp_path / "run", {"command": "test"}) as writer:
            for step in range(4):
                writer.step({"step": step, "loss": 1.0})
                if step % 2 == 1:
                    report_metric("val_loss", 0.5 / step)  # at the run's current step
            report_metric("acc", 0.9, step=10)  # at a step the script names
            writer.summary({"steps": 4, "status": "clean"})
    acc = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("val/val_loss")] == [(1, 0.5), (3, round(0.5 / 3, 6))]
    assert [(e.step, e.value) for e in acc.Scalars("val/acc")] == [(10, pytest.approx(0.9))]


def test_report_metric_without_a_sweep_or_sink_does_nothing() -> None:
    report_metric("val_loss", 0.25)  # no handler, no sink: no error, nothing written
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        report_metric("", 1.0)
