"""An instrument never ends the run (issue #30): the ESPRIT-style script whose eig eigenvectors receive no
gradient traces cleanly, and an instrument part that fails is recorded once (an ``instrument_error`` event,
its traceback in the run folder, nothing on the terminal), switched off, and the training goes on with
exactly the results of a run without the toolkit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import ris_stability
from ris_stability import cli
from ris_stability.records.capsule import clone_state

SCRIPTS = Path(__file__).parent / "scripts"


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def test_esprit_like_script_traces_clean_with_zero_glue(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli.main(["trace", "--out", str(run_dir), "--no-report", "--no-live", "--",
                     "python", str(SCRIPTS / "esprit_like.py")])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert code == 0 and summary["status"] == "clean" and summary["steps"] == 3
    assert "instrument_errors" not in summary
    assert not [e for e in events(run_dir) if e["kind"] == "instrument_error"]
    assert "Traceback" not in capsys.readouterr().err


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    return lin, torch.optim.Adam(lin.parameters(), lr=1e-2), torch.randn(3, 6, 6)


def train(lin: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int = 4) -> tuple[list[float], dict]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        a = lin(x)
        w, v = torch.linalg.eigh(a @ a.transpose(-1, -2) + torch.eye(6))
        loss = w.sum() + v.abs().sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, clone_state(lin.state_dict())


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _boom(*args, **kwargs):
    raise ZeroDivisionError("planted instrument fault")


def _owner(dotted: str):
    import importlib

    module, _, name = dotted.rpartition(":")
    owner = importlib.import_module(module or dotted)
    return getattr(owner, name) if module else owner


# (id, "module[:class]" to patch, attribute, the guard part that must switch off)
PLANTED = [
    ("probe-backward-hook", "ris_stability.linalg.site_grads", "float64_norms", "probe.backward_hooks"),
    ("probe-forward-listener", "ris_stability.instruments.probe:SpectralProbe", "_site", "intercept:SpectralProbe"),
    ("monitor-step-end", "ris_stability.monitor:StabilityMonitor", "on_step_end", "driver"),
    ("grads-before-update", "ris_stability.monitor:StabilityMonitor", "on_before_optimizer_step", "driver"),
]


@pytest.mark.parametrize("target,attr,part", [p[1:] for p in PLANTED], ids=[p[0] for p in PLANTED])
@pytest.mark.parametrize("front_door", ["watch", "discovery"])
def test_a_failing_instrument_is_recorded_once_and_switched_off(tmp_path, monkeypatch, capsys, target, attr, part,
                                                                front_door):
    plain = train(*build())
    monkeypatch.setattr(_owner(target), attr, _boom)
    run_dir = tmp_path / "run"
    lin, opt, x = build()
    named = (lin, opt) if front_door == "watch" else (None, None)  # None, None: found as a traced script is
    with ris_stability.watch(*named, out=run_dir, report=False) as w:
        watched = train(lin, opt, x)
    assert watched[0] == plain[0] and same(watched[1], plain[1])  # bit-identical losses and parameters
    errors = [e["data"] for e in events(run_dir) if e["kind"] == "instrument_error"]
    assert [e["part"] for e in errors] == [part]  # once, however many steps met the fault
    assert "ZeroDivisionError: planted instrument fault" in (run_dir / errors[0]["traceback"]).read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [e["part"] for e in summary["instrument_errors"]] == [part]
    assert "planted instrument fault" not in capsys.readouterr().err  # the traceback stays in the folder
    assert w.status == "clean"


def test_the_stop_policy_still_passes_the_guard(tmp_path):
    """NonFiniteError is the policy's own control flow: the guard lets it through (the block ends)."""
    from ris_stability.monitor.context import NonFiniteError
    from ris_stability.observe import guard

    assert guard.passes(NonFiniteError("stop")) and guard.passes(KeyboardInterrupt())
    assert not guard.passes(AttributeError("x"))


def test_precision_audit_of_an_esprit_like_loss_does_not_fail():
    """The precision audit's eig hook meets the same None eigenvector gradient as the probe's."""
    from ris_stability import audit_precision
    from ris_stability.observe import guard

    torch.manual_seed(0)
    lin, x = nn.Linear(8, 8), torch.randn(4, 8, 8)

    def loss_fn():
        a = lin(x)
        w, v = torch.linalg.eig((a @ a.transpose(-1, -2) + torch.eye(8)).to(torch.complex64))
        us = v[..., :3]
        pw, _ = torch.linalg.eig(torch.linalg.pinv(us[..., :-1, :]) @ us[..., 1:, :])
        return pw.angle().abs().sum()

    audit_precision(loss_fn, roots={"lin": lin})
    assert guard.errors() == []


@pytest.mark.parametrize("stage", ["_prepare", "_after"])
def test_a_fault_in_the_locators_own_work_switches_it_off_and_the_op_still_runs(tmp_path, monkeypatch, stage):
    from ris_stability.locate import taint
    from ris_stability.observe import guard
    from ris_stability.observe.tracker import ModuleTracker

    monkeypatch.setattr(taint._DispatchChecks, stage, lambda *a, **k: _boom())
    checks = taint._DispatchChecks(ModuleTracker())
    guard.bind(tmp_path, lambda *a, **k: None)
    try:
        out = checks.dispatch(torch.ops.aten.mul.Tensor, (torch.tensor([2.0]), torch.tensor([3.0])), {})
        assert out.tolist() == [6.0]  # the op ran once, its result unchanged
        assert guard.is_off(taint.LOCATOR) and [e["part"] for e in guard.errors()] == [taint.LOCATOR]
        out = checks.dispatch(torch.ops.aten.add.Tensor, (torch.tensor([2.0]), torch.tensor([3.0])), {})
        assert out.tolist() == [5.0]  # switched off: passed straight through
        assert len(guard.errors()) == 1
    finally:
        guard.unbind()
