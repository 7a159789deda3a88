"""A full or failing disk never kills training (issue #30): the trace writer's first OSError (an injected
ENOSPC) is one warning, the training goes on with the results of a run without the toolkit, the lines the disk
refused are kept in memory and written when it takes them again (no torn, no doubled line), and the summary
says what was not written when it never does."""
from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import ris_stability
from ris_stability.records import appender, read_trace
from ris_stability.records.capsule import clone_state

STEPS = 8


class Disk:
    """os.write for the record files: full (ENOSPC) while ``full``; the first refused write takes half its bytes."""

    def __init__(self, write):
        self.write, self.full, self.torn = write, False, False

    def __call__(self, fd: int, data: bytes) -> int:
        if self.full:
            if not self.torn and len(data) > 1:  # a write the disk cut short, then refused
                self.torn = True
                return self.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.write(fd, data)


def train(disk: Disk | None, full_from: int, full_until: int) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(12, 5), torch.randn(12, 1)
    losses = []
    for step in range(STEPS):
        if disk is not None:
            disk.full = full_from <= step < full_until
        opt.zero_grad()
        a = model[0](x)
        w, _ = torch.linalg.eigh(a.T @ a + torch.eye(5))  # the probe writes statistics rows too
        loss = (model(x) - y).pow(2).mean() + 1e-3 * w.sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, clone_state(model.state_dict())


def ours(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("ris_stability") and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("full_until", [5, STEPS + 1], ids=["disk-frees-up", "full-to-the-end"])
def test_a_full_disk_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, caplog, full_until):
    plain = train(None, 0, 0)
    disk = Disk(appender._write)
    monkeypatch.setattr(appender, "_write", disk)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        with ris_stability.watch(out=run_dir, report=False) as w:
            got = train(disk, 2, full_until)
        disk.full = False  # for the summary: the disk is full for the record files only
    assert got[0] == plain[0] and all(torch.equal(got[1][k], plain[1][k]) for k in plain[1])
    warnings = ours(caplog)
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage(), warnings
    assert w.status == "clean"
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line whole: no torn or doubled row
    steps = [r["step"] for r in rows]
    if full_until <= STEPS:  # the disk took the kept lines when it had room again
        assert steps == list(range(STEPS))
        assert summary["not_written"]["steps.jsonl"]["lines_lost"] == 0
    else:  # the rows before the disk filled are there, whole; the summary counts the rest
        assert steps == list(range(len(steps))) and len(steps) < STEPS
        lost = summary["not_written"]["steps.jsonl"]
        assert lost["lines_lost"] == STEPS - len(steps) and "No space left" in lost["error"]
    assert len(read_trace(run_dir).steps) == len(steps)


def test_the_memory_kept_for_a_full_disk_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(appender, "_write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    f = appender.AppendFile(tmp_path / "x.jsonl", max_pending=100, on_error=lambda failed: None)
    for i in range(50):
        f.write(json.dumps({"i": i}))
    losses = f.losses()
    assert losses["lines_lost"] == 50 and losses["lines_dropped"] > 0 and f._pending_bytes <= 100
    f.close()
