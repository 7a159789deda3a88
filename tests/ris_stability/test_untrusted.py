"""Artefacts are atomic and untrusted folders stay data (issue #30): a kill before the rename leaves the old
report (or none) and no temporary file; a capsule that does not load is named in one line and ``bisect`` takes
the next good one; a planted malicious pickle is refused without running its code."""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from ris_stability.records import TraceWriter
from ris_stability.records import atomic
from ris_stability.records.capsule import Capsule, CapsuleError, capsule_path, capture_rng
from ris_stability.replay.bisect import first_bad_step

PLANTED = "planted_code_ran"


class Payload:
    """Unpickling it would create a file: the proof that a load ran foreign code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def run_folder(tmp_path: Path, bad_steps: tuple[int, ...] = (1, 2)) -> Path:
    run_dir = tmp_path / "run"
    with TraceWriter(run_dir, {"command": "test"}) as w:
        for step in range(4):
            w.step({"step": step, "loss": float("nan") if step in bad_steps else 1.0, "nonfinite": step in bad_steps})
        w.summary({"steps": 4, "status": "nonfinite", "nonfinite_steps": list(bad_steps)})
    for step in bad_steps:
        Capsule(step=step, batch={"x": torch.ones(2)}, model_state={"w": torch.zeros(2)}, optimizer_state=None,
                rng=capture_rng()).save(capsule_path(run_dir, step))
    return run_dir


def test_a_malicious_pickle_capsule_is_refused_without_running_it(tmp_path):
    marker = tmp_path / PLANTED
    evil = tmp_path / "evil.pt"
    torch.save({"format": "risdiag-capsule", "version": 1, "step": Payload(marker)}, evil)  # a pickle, any torch.load runs
    with pytest.raises(CapsuleError, match="evil.pt"):
        Capsule.load(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CapsuleError, match="raw.pt"):
        Capsule.load(raw)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "malicious"])
def test_bisect_skips_a_capsule_that_does_not_load_for_the_next_good_one(tmp_path, caplog, damage):
    run_dir = run_folder(tmp_path)
    first = capsule_path(run_dir, 1)
    marker = tmp_path / PLANTED
    if damage == "truncated":  # a kill in the middle of a write that was not atomic
        first.write_bytes(first.read_bytes()[:200])
    else:
        torch.save({"format": "risdiag-capsule", "version": 1, "step": Payload(marker)}, first)
    with caplog.at_level(logging.WARNING):
        step, path = first_bad_step(run_dir)
    assert (step, path) == (2, capsule_path(run_dir, 2))
    skipped = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(skipped) == 1 and "step_000001.pt" in skipped[0] and "\n" not in skipped[0]
    assert not marker.exists()


def test_a_kill_before_the_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("old report")

    def killed(src, dst):
        raise KeyboardInterrupt  # the kill lands between the write and the rename

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_text_atomic(target, "new report, half writ")
    assert target.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_report_and_summary_are_written_through_a_rename(tmp_path, monkeypatch):
    """report.md, figures and summary.json go through records.atomic (a rename per file)."""
    from ris_stability.report.build import build_report

    run_dir = run_folder(tmp_path)
    renamed = []
    real = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (renamed.append(Path(dst).name), real(src, dst)))
    build_report(run_dir)
    assert "report.md" in renamed and any(name.endswith(".png") for name in renamed)
    assert not [p for p in run_dir.rglob("*.tmp")]
