"""Explosions seen from step 0: the rules of instruments/explosion.py on a table of norms, the on_explosion policy
on an outside-style SGD script whose learning rate is too large (tests/ris_stability/scripts/explodes.py:
explodes at steps 1-2, crashes at step 3), the crash traced back to the update of step 2, and no explosion
event on clean runs of the small outside scripts and models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ris_stability import cli
from ris_stability.attach.script import EXIT_SCRIPT_ERROR
from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.instruments.explosion import ExplosionDetector
from ris_stability.numerics.tolerances import explosion_norm_limit
from ris_stability.records import SettingError, read_trace

from tests.ris_stability.eig_models import eig_loss, eig_setup, make_batch

SCRIPTS = Path(__file__).parent / "scripts"
EXPLODES = str(SCRIPTS / "explodes.py")

# (id, [(total, update_ratio), ...] one per step, has_baseline, the last step's expected rules, catastrophic)
RULES = [
    ("steady", [(1.0, 0.01), (2.0, 0.01), (1.5, 0.01)], False, None, False),
    ("wobble-30x-early", [(1.0, None), (30.0, None)], False, None, False),
    ("growth-200x-early", [(1.0, None), (200.0, None)], False, ("early_growth",), False),
    ("growth-200x-with-baseline", [(1.0, None), (200.0, None)], True, None, False),
    ("growth-1e7x", [(1.0, None), (1e7, None)], True, ("growth",), True),
    ("float32-range-at-step-0", [(1e20, None)], False, ("range",), True),
    ("sgd-update-beyond-the-weights", [(5.0, 1.5)], False, ("update",), True),
    ("sgd-update-below-the-weights", [(5.0, 0.9)], False, None, False),
]


@pytest.mark.parametrize("steps,baseline,rules,catastrophic", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_explosion_rules(steps, baseline, rules, catastrophic):
    d = ExplosionDetector(torch.float32)
    verdict = None
    for step, (total, update) in enumerate(steps):
        verdict = d.observe(step, total, {"enc": total / 2, "head": total / 3}, {}, {"enc": 1.0, "_total": 1.0},
                            update, has_baseline=baseline)
    if rules is None:
        assert verdict is None
        return
    assert verdict is not None and verdict.rules == rules and verdict.catastrophic is catastrophic
    assert verdict.modules and verdict.modules[0].name == "enc"  # the largest / most grown module is named first
    assert "enc" in verdict.message()


def test_range_limits_follow_the_dtype():
    assert explosion_norm_limit(torch.float32) == pytest.approx(math.sqrt(torch.finfo(torch.float32).max))
    assert explosion_norm_limit(torch.complex128) == pytest.approx(math.sqrt(torch.finfo(torch.float64).max))
    assert explosion_norm_limit(torch.float16) > 256  # float16's sqrt(max) is a routine gradient norm


def test_trace_back_names_the_update_that_grew_the_parameters():
    d = ExplosionDetector(torch.float32)
    # step 0: a zero-initialised head (norm 0) must not count as infinite growth; step 1 grows conv3 10x,
    # step 2's update sends it to 1.7e15: that update is the origin
    for step, (conv3, head, grad) in enumerate([(2.1, 0.0, 2e4), (2.5, 0.3, 6.5e5), (25.0, 0.3, 6.8e19)]):
        d.observe(step, grad, {"conv3": grad}, {}, {"conv3": conv3, "head": head, "_total": conv3})
    origin = d.trace_back({"conv3": 1.7e15, "head": 0.3})
    assert (origin.module, origin.step, origin.before, origin.after) == ("conv3", 2, 25.0, 1.7e15)
    assert "at the update of step 2" in origin.message() and "3.4e+15x its first value" in origin.message()
    assert d.trace_back({"conv3": 25.0, "head": 0.3}, skipped={2}) is None  # a skipped update grew nothing
    assert d.trace_back({"conv3": 30.0, "head": 0.3}) is None  # a healthy history explains nothing


def test_setting_is_validated():
    with pytest.raises(SettingError, match="on_explosion"):
        MonitorConfig(on_explosion="ignore")


def _trace(tmp_path: Path, *argv: str, options: tuple[str, ...] = ()) -> tuple[int, Path]:
    run_dir = tmp_path / "run"
    code = cli.main(["trace", "--out", str(run_dir), "--no-live", *options, "--", "python", *argv])
    return code, run_dir


def _explosions(trace) -> list[dict]:
    return [e for e in trace.events if e["kind"] == "gradient_explosion"]


def test_observe_sees_the_explosion_and_traces_the_crash_to_the_update_of_step_2(tmp_path):
    code, run_dir = _trace(tmp_path, EXPLODES)
    assert code == EXIT_SCRIPT_ERROR  # the script's own eigvals raised at step 3
    t = read_trace(run_dir)
    first = _explosions(t)[0]
    assert first["step"] <= 2 and first["severity"] == "error"
    assert {"conv1", "conv3"} & set(first["data"]["names"]) and "conv" in first["message"]
    assert [e["step"] for e in _explosions(t)] == [1, 2]  # the update of step 0 (0.92x the weights) is no explosion
    origin = next(e for e in t.events if e["kind"] == "explosion_origin")
    assert origin["step"] == 2 and origin["data"]["module"] == "conv3"
    finding = next(e for e in t.events if e["kind"] == "finding")
    assert finding["step"] == 3 and "at the update of step 2" in finding["message"]
    assert "overflow" in finding["message"]  # next to the forward origin the locator found
    stopped = next(e for e in t.events if e["kind"] == "run_stopped")
    assert "eig" in stopped["message"] and "at the update of step 2" in stopped["message"]
    assert "at the update of step 2" in json.loads((run_dir / "finding.json").read_text())["update_origin"]
    report = (run_dir / "report.md").read_text()
    assert "Gradient explosion" in report and "update of step 2" in report and "--on-explosion skip" in report


def test_skip_keeps_the_parameters_finite_and_the_run_alive(tmp_path):
    saved = tmp_path / "final.pt"
    code, run_dir = _trace(tmp_path, EXPLODES, "--save", str(saved), options=("--on-explosion", "skip", "--no-report"))
    assert code == cli.EXIT_OK
    t = read_trace(run_dir)
    assert t.summary["status"] == "clean" and 1 in t.skipped_steps and bool((t.steps["loss"] < 1e3).all())
    assert [e for e in t.events if e["kind"] == "step_skipped"][0]["data"]["reason"] == "explosion"
    state = torch.load(saved, weights_only=True)
    assert all(bool(torch.isfinite(v).all()) and float(v.abs().max()) < 10 for v in state.values())


def test_stop_ends_the_run_before_the_update(tmp_path):
    code, run_dir = _trace(tmp_path, EXPLODES, options=("--on-explosion", "stop", "--no-report"))
    t = read_trace(run_dir)
    assert code == cli.EXIT_NONFINITE and t.summary["status"] == "stopped"
    assert t.skipped_steps == [1] and _explosions(t)[0]["step"] == 1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, *, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


def test_session_skip_leaves_parameters_and_momentum_untouched(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 4)
    monitor = StabilityMonitor(tmp_path / "run", MonitorConfig(on_explosion="skip"))
    with MonitorSession(monitor, model, opt) as s:
        for step in range(3):
            scale = 1e12 if step == 2 else 1.0  # an unnormalised batch at step 2
            s.start_step(step, batch={"x": x})
            loss = model(x=x * scale).square().mean()
            s.after_forward(loss)
            opt.zero_grad()
            loss.backward()
            before = ({k: v.clone() for k, v in model.state_dict().items()},
                      [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()] if step else [])
            if s.after_backward():
                opt.step()
            s.end_step()
    assert monitor.skipped_steps == [2] and monitor.explosion_steps == [2]
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), before[1]))


CLEAN = [  # outside scripts run without their planted fault (fault step past the end)
    (EXPLODES, "--lr", "0.002", "--steps", "12"),
    (str(SCRIPTS / "eigh_whiten.py"), "--steps", "12", "--fault-step", "99"),
    (str(SCRIPTS / "sqrt_rows.py"), "--steps", "12", "--fault-step", "99"),
    (str(SCRIPTS / "svd_polar.py"), "--steps", "12", "--fault-step", "99"),
    (str(SCRIPTS / "amp_scaler.py"), "--steps", "12"),
]


@pytest.mark.parametrize("argv", CLEAN, ids=[Path(c[0]).stem for c in CLEAN])
def test_clean_outside_scripts_raise_no_explosion(tmp_path, argv):
    code, run_dir = _trace(tmp_path, *argv, options=("--no-report",))
    t = read_trace(run_dir)
    assert _explosions(t) == [] and code == cli.EXIT_OK
    assert not [s for s in t.skipped_steps if s not in t.summary.get("amp_overflow_steps", [])]


def test_clean_eig_model_raises_no_explosion(tmp_path):
    net, loss_fn = eig_setup()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    monitor = StabilityMonitor(tmp_path / "run", MonitorConfig(on_explosion="stop"))
    with MonitorSession(monitor, net, opt) as s:
        for step in range(12):
            batch = make_batch(1.0, seed=step)
            s.start_step(step, batch=batch)
            loss = eig_loss(net, loss_fn, batch)
            s.after_forward(loss)
            opt.zero_grad()
            loss.backward()
            if s.after_backward():
                opt.step()
            s.end_step()
    assert monitor.explosion_steps == [] and monitor.skipped_steps == []


def test_nonfinite_loss_is_traced_back_to_the_update_that_grew_the_parameters(tmp_path):
    # a quartic loss far from its target with SGD at lr 3e-3: gradient 6e3 -> 2e5 -> 5e17, loss inf at step 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=3e-3)
    x = torch.randn(32, 8)
    monitor = StabilityMonitor(tmp_path / "run")
    with MonitorSession(monitor, model, opt) as s:
        for step in range(5):
            s.start_step(step, batch={"x": x})
            loss = (model(x) - 10.0).pow(4).mean()
            s.after_forward(loss)
            opt.zero_grad()
            loss.backward()
            if s.after_backward():
                opt.step()
            s.end_step()
    t = read_trace(tmp_path / "run")
    assert monitor.nonfinite_steps[0] == 3 and _explosions(t)[0]["step"] <= 2
    event = next(e for e in t.events if e["kind"] == "nonfinite_loss")
    assert "at the update of step 2" in event["message"] and "parameters of 0 grew" in event["message"]


def test_explosion_checks_read_nothing_on_unlogged_steps(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # observe: under skip / stop every step reads its verdict once (that one read is counted in test_host_reads)
    monitor = StabilityMonitor(tmp_path / "run", MonitorConfig(every=3, policy="observe"))
    reads: dict[int, int] = {}
    step = 0
    original = torch.Tensor.tolist

    def counting(self):  # tolist is how the grad monitor reads its one block back
        reads[step] = reads.get(step, 0) + 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    with MonitorSession(monitor, model, opt) as s:
        for step in range(7):
            x = torch.randn(16, 4)
            s.start_step(step, batch={"x": x})
            loss = model(x=x).square().mean()
            s.after_forward(loss)
            opt.zero_grad()
            loss.backward()
            if s.after_backward():
                opt.step()
            s.end_step()
    monkeypatch.setattr(torch.Tensor, "tolist", original)
    assert [r.step for r in monitor.explosions._records] == [0, 3, 6]
    assert not any(reads.get(k) for k in (1, 2, 4, 5)) and reads.get(3)  # unlogged steps: no read-back at all
