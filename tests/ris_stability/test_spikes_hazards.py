"""Gradient spikes as incidents and the right hazard per op, on outside-style models (eig_models.py)."""
from __future__ import annotations

import math

import pytest
import torch

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.records import read_trace
from ris_stability.report.look import what_to_look_at
from ris_stability.instruments.spikes import SpikeConfigError, SpikeDetector

from tests.ris_stability.eig_models import (CompanionRoots, HermitianEig, PinvHead, eig_loss, eig_setup,
                                            make_batch)

HIGH_SCALE, SPIKE_STEP, STEPS = 1e10, 7, 9


def test_spike_detector_baseline_and_attribution():
    det = SpikeDetector(factor=10.0, window=20, warmup=5)
    for step in range(5):  # warm-up: no baseline yet, whatever the value
        assert det.observe(step, 1e6 if step == 0 else 1.0 + 0.1 * step, {"a": 0.5, "b": 0.5}, {"s": 1.0}) is None
    assert det.observe(5, 5.0, {"a": 0.5, "b": 4.0}) is None  # 4x: noise, not a spike
    spike = det.observe(6, 50.0, {"a": 0.6, "b": 49.0}, {"s": 300.0})
    assert spike is not None and spike.total.baseline == pytest.approx(1.35)  # median of 1e6, 1.1 .. 1.4, 5
    assert [j.name for j in spike.modules] == ["b"] and [j.name for j in spike.sites] == ["s"]
    assert "module b" in spike.message() and "linalg site s" in spike.message()
    assert det.observe(7, math.inf, {"a": 1.0}) is None  # non-finite: the non-finite checks' business
    for step in range(8, 20):
        assert det.observe(step, math.nan if step % 2 else math.inf, {"a": math.inf}) is None
    # ... and never part of a baseline: a jump over the finite history's median (1.4) is still a spike
    late = det.observe(20, 500.0, {"a": 0.6, "b": 400.0})
    assert late is not None and late.total.baseline == pytest.approx(1.4) and [j.name for j in late.modules] == ["b"]


@pytest.mark.parametrize("kwargs", [{"spike_factor": 1.0}, {"spike_window": 2}, {"audit_every": -1}],
                         ids=["factor-1", "window-2", "audit-negative"])
def test_monitor_config_rejects_bad_spike_settings(kwargs):
    with pytest.raises(ValueError, match="spike_factor"):
        MonitorConfig(**kwargs)


def test_spike_detector_rejects_bad_settings():
    with pytest.raises(SpikeConfigError):
        SpikeDetector(factor=0.5)


def _eig_run(path, spike_step: int | None):
    net, loss_fn = eig_setup()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    monitor = StabilityMonitor(path, MonitorConfig(policy="observe"))
    batch: dict = {}
    with MonitorSession(monitor, net, opt, loss_fn, audit_fn=lambda: eig_loss(net, loss_fn, batch)) as s:
        for step in range(STEPS):
            batch = make_batch(HIGH_SCALE if step == spike_step else 1.0, seed=step)
            opt.zero_grad(set_to_none=True)
            s.start_step(step, batch=batch)
            loss = eig_loss(net, loss_fn, batch)
            s.after_forward(loss)
            loss.backward()
            if s.after_backward():
                opt.step()
            s.end_step()
    return read_trace(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eig")
    return _eig_run(root / "healthy", None), _eig_run(root / "exploding", SPIKE_STEP)


def _kinds(trace) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in trace.events:
        out.setdefault(e["kind"], []).append(e)
    return out


def test_spike_event_fires_and_names_the_eig_site(runs):
    _, exploding = runs
    kinds = _kinds(exploding)
    (spike,) = kinds["gradient_spike"]
    assert spike["step"] == SPIKE_STEP and "loss:linalg.eig" in [s["name"] for s in spike["data"]["sites"]]
    assert spike["data"]["total"] > 100 * spike["data"]["baseline"]
    assert not [k for k in kinds if k.startswith("nonfinite")]  # huge, finite: a spike, not a NaN
    (audit,) = kinds["precision_audit"]
    assert audit["severity"] == "warning" and audit["data"]["culprit"] == "loss:linalg.eig"
    assert "phase term noise" in audit["message"]
    assert kinds["eig_backward_rounding"][0]["step"] == SPIKE_STEP
    # the step is saved once: a spike snapshot, or (when the jump is also a catastrophic explosion, see
    # test_explosions) the explosion's crash capsule - never both
    snapshot = exploding.run_dir / "snapshots" / f"spike_{SPIKE_STEP:06d}.pt"
    capsule = exploding.run_dir / "capsules" / f"step_{SPIKE_STEP:06d}.pt"
    assert snapshot.is_file() != capsule.is_file()
    assert not snapshot.is_file() or f"snapshots/spike_{SPIKE_STEP:06d}.pt" in spike["message"]


def test_healthy_run_has_no_false_hazards(runs):
    healthy, _ = runs
    kinds = _kinds(healthy)
    for kind in ("gradient_spike", "tied_eigenvalues", "ill_conditioned", "eig_backward_rounding", "precision_audit"):
        assert kind not in kinds, kinds.get(kind)
    assert "eig_hermitian_input" in kinds  # a true, run-independent suggestion


def test_report_hazard_items_differ_between_healthy_and_exploding(runs):
    healthy, exploding = (what_to_look_at(t) for t in runs)
    assert healthy == [i for i in healthy if "torch.linalg.eigh" in i] and len(healthy) == 1
    new = [i for i in exploding if i not in healthy]
    assert any(i.startswith("**Gradient spike at step 7**") and "`loss:linalg.eig`" in i for i in new)
    assert any(i.startswith("**Precision audit at step 7**") for i in new)
    assert any("rounding dominates the eig backward at steps 7" in i for i in new)
    assert not any("1/gap" in i or "eigh_backward" in i for i in exploding)


def _monitored(path, model, *args, steps: int = 3):
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    with MonitorSession(StabilityMonitor(path, MonitorConfig(policy="observe")), model, opt) as s:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            s.start_step(step)
            loss = model(*args)
            s.after_forward(loss)
            loss.backward()
            if s.after_backward():
                opt.step()
            s.end_step()
    return read_trace(path)


def test_companion_eigvals_and_harmless_pinv_are_not_flagged(tmp_path):
    torch.manual_seed(0)
    companion = _monitored(tmp_path / "companion", CompanionRoots())
    assert companion.steps["mat/model:linalg.eigvals/rel_sep"].min() > 1e-4  # separated roots (far from float32 rounding)
    pinv = _monitored(tmp_path / "pinv", PinvHead(), torch.randn(6, 2))
    for trace in (companion, pinv):
        assert [e for e in trace.events if e["severity"] != "info"] == []
        assert what_to_look_at(trace)[0].startswith("Nothing stands out")


def test_pinv_near_its_cutoff_is_flagged(tmp_path):
    head = PinvHead()
    with torch.no_grad():
        head.A.copy_(torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1e-6])))  # cut-off 6 eps = 7.2e-7
    trace = _monitored(tmp_path / "pinv", head, torch.randn(6, 2), steps=1)
    assert [e["kind"] for e in trace.events if e["severity"] == "warning"] == ["pinv_cutoff"]
    assert any("pinv's cut-off" in i for i in what_to_look_at(trace))


def test_eig_of_a_hermitian_input_suggests_eigh(tmp_path):
    torch.manual_seed(0)
    trace = _monitored(tmp_path / "herm", HermitianEig(), steps=1)
    (event,) = [e for e in trace.events if e["kind"] == "eig_hermitian_input"]
    assert "torch.linalg.eigh" in event["message"]
    assert any("use torch.linalg.eigh" in i for i in what_to_look_at(trace))
