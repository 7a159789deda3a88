"""The host reads ris_stability makes per step, counted on CPU through the public front doors (each one is a
GPU sync on CUDA): under policy observe none on a step that is not sampled and at most one on a sampled step;
under skip / stop exactly one per step, the read the skip decision needs (as a GradScaler's finite check).
A new ``.item()`` / ``float(t)`` / ``bool(t)`` / ``.tolist()`` anywhere in a clean step fails here, and so does an
op that syncs without a read (``nonzero``, a mask selection) or Python data made into a device tensor after the
first step (a list used as an index: a host-to-device copy a GPU waits for)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.ris_stability.host_reads import counting
from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor, watch
from ris_stability.attach.script import trace_script

STEPS = 12
SCRIPT = textwrap.dedent(f"""
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range({STEPS}):
        x = torch.randn(4, 8)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        print(float(loss.detach()))  # the script's own read: not the toolkit's
        opt.step()
""")
# research-style: sanitise and clip the gradients between backward and step (rewritten in place every step)
REWRITES = SCRIPT.replace("    opt.step()", """    for p in model.parameters():
        p.grad.nan_to_num_(nan=0.0)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()""")
assert REWRITES != SCRIPT


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _watch(tmp: Path, cfg: MonitorConfig):
    model, opt = _model()
    with counting() as reads:
        with watch(model, opt, out=tmp / "run", report=False, config=cfg):
            for _ in range(STEPS):
                opt.zero_grad()
                loss = model(torch.randn(4, 8)).pow(2).mean()
                loss.backward()
                opt.step()
    return reads


def _session(tmp: Path, cfg: MonitorConfig):
    model, opt = _model()
    with counting() as reads:
        with MonitorSession(StabilityMonitor(tmp / "run", cfg), model, opt) as s:
            for step in range(STEPS):
                s.start_step(step)
                opt.zero_grad()
                loss = model(torch.randn(4, 8)).pow(2).mean()
                s.after_forward(loss, terms={"mse": loss})
                loss.backward()
                if s.after_backward():
                    opt.step()
                s.end_step()
    return reads


class _Whiten(nn.Module):
    """A linear layer, then ZCA whitening through eigh (a linear-algebra site for the probe to measure)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(8, 6), nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h = h - h.mean(0)
        evals, evecs = torch.linalg.eigh(h.mT @ h / h.shape[0] + 1e-2 * torch.eye(h.shape[1]))
        return self.head(h @ evecs @ torch.diag(evals.rsqrt()) @ evecs.mT).pow(2).mean()


def _session_eigh(tmp: Path, cfg: MonitorConfig):
    """The probe's statistics of an eigh site ride in the same read."""
    torch.manual_seed(0)
    model = _Whiten()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with counting() as reads:
        with MonitorSession(StabilityMonitor(tmp / "run", cfg), model, opt) as s:
            for step in range(STEPS):
                s.start_step(step)
                opt.zero_grad()
                loss = model(torch.randn(16, 8))
                s.after_forward(loss)
                loss.backward()
                if s.after_backward():
                    opt.step()
                s.end_step()
    return reads


def _watch_amp(tmp: Path, cfg: MonitorConfig):
    """A GradScaler loop (zero glue): the scaler's own finite check is the loop's read, not the toolkit's."""
    model, opt = _model()
    scaler = torch.amp.GradScaler("cpu")
    with counting() as reads:
        with watch(model, opt, out=tmp / "run", report=False, config=cfg):
            for _ in range(STEPS):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(torch.randn(4, 8)).pow(2).mean()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
    return reads


def _script(tmp: Path, cfg: MonitorConfig, text: str = SCRIPT):
    script = tmp / "train.py"
    script.write_text(text)
    with counting() as reads:
        trace_script(["python", str(script)], str(tmp / "run"), config=cfg)
    return reads


DOORS = {"watch": _watch, "session": _session, "session_eigh": _session_eigh, "script": _script, "watch_amp": _watch_amp,
         "script_rewrites": lambda tmp, cfg: _script(tmp, cfg, REWRITES)}


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("policy", ["skip", "stop", "observe"])
@pytest.mark.parametrize("door", sorted(DOORS))
def test_reads_per_step(tmp_path, door, policy, every, capsys):
    reads = DOORS[door](tmp_path, MonitorConfig(every=every, policy=policy, update_every=2, dead_after=3))
    steps = range(STEPS)
    sampled = [s for s in steps if s % every == 0]
    unsampled = [s for s in steps if s % every]
    detail = reads.report([*steps, "setup", "finish"])
    if policy == "observe":
        assert all(reads.by_step[s] <= 1 for s in sampled), detail
        assert all(reads.by_step[s] == 0 for s in unsampled), detail
    else:
        assert reads.steps(steps) == [1] * STEPS, detail
    assert reads.by_step["setup"] == 0 and reads.by_step["finish"] <= 1, detail
    # No Python data made into a device tensor once the first step has built what it caches (a copy a GPU waits for).
    assert [reads.copies[s] for s in steps[1:]] == [0] * (STEPS - 1), dict(reads.copy_where)


def test_rows_are_complete_after_the_deferred_reads(tmp_path):
    """Rows read later are written with the same fields, in step order, nothing lost at the end of the run."""
    import json
    _session(tmp_path, MonitorConfig(every=4, policy="observe", update_every=1))
    rows = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4, 8]
    for r in rows:
        assert {"loss", "lr", "skipped", "nonfinite", "grad/_total", "update_ratio/0", "loss/mse"} <= set(r), r
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final_loss"] is not None
