"""fp16 AMP as a user sees it through MonitorSession with a GradScaler: what is an overflow and what is a fault,
the gradient norm logged in true units whether or not the loop unscales, and the scale-collapse incident.
Plus the duck-typed scaler readers (monitor/amp.py) and ScalerSpy (observe/scaler.py) on a real GradScaler."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.monitor import amp
from ris_stability.observe import guard
from ris_stability.observe.scaler import ScalerSpy
from ris_stability.records import read_trace

SCALE = 1024.0


def _true_grad_norm() -> float:
    model, x = _model()
    model(x).pow(2).mean().backward()
    return float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())


def _model() -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(4, 1), torch.randn(8, 4)


def _run(path, scaler, steps: int = 3, nan_step: int | None = None, unscale: bool = False, cfg=None):
    """SGD with lr=0 (the gradient is the same every step); at ``nan_step`` the loss stays finite but the bias
    gradient is NaN (d sqrt(x)/dx at 0 = inf, times 0): a real fault, not an fp16 overflow."""
    model, x = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with MonitorSession(StabilityMonitor(path, cfg or MonitorConfig(policy="observe")), model, opt,
                        scaler=scaler) as s:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            s.start_step(step)
            loss = model(x).pow(2).mean()
            if step == nan_step:
                loss = loss + (model.bias * 0).sum().sqrt()
            s.after_forward(loss)
            scaler.scale(loss).backward()
            if unscale:
                scaler.unscale_(opt)
            if s.after_backward():
                scaler.step(opt)
                scaler.update()
            s.end_step()
    return read_trace(path)


def _events(trace, kind: str) -> list[dict]:
    return [e for e in trace.events if e["kind"] == kind]


def test_disabled_scaler_real_nan_step_is_a_fault_with_a_capsule(tmp_path):
    trace = _run(tmp_path / "run", torch.amp.GradScaler("cpu", enabled=False), nan_step=1)
    assert [e["step"] for e in _events(trace, "nonfinite_grad")] == [1]
    assert "bias" in _events(trace, "nonfinite_grad")[0]["message"]
    assert not _events(trace, "amp_overflow") and trace.summary["amp_overflow_steps"] == []
    assert (trace.run_dir / "capsules" / "step_000001.pt").is_file()
    assert trace.summary["status"] == "nonfinite" and 1 in trace.summary["nonfinite_steps"]
    assert "amp_scale" not in trace.steps  # no scaler in use: no scale column


def test_enabled_scaler_overflow_is_routine(tmp_path):
    trace = _run(tmp_path / "run", torch.amp.GradScaler("cpu", init_scale=SCALE), nan_step=1)
    (overflow,) = _events(trace, "amp_overflow")
    assert overflow["step"] == 1 and overflow["severity"] == "info" and overflow["data"]["scale"] == SCALE
    assert "scale 1024" in overflow["message"]
    assert trace.summary["status"] == "clean" and trace.summary["nonfinite_steps"] == []
    assert trace.summary["amp_overflow_steps"] == [1]
    assert not (trace.run_dir / "capsules").exists()
    assert list(trace.steps["amp_scale"]) == [SCALE, SCALE, SCALE / 2]  # the scaler halved it after the overflow
    assert list(trace.steps["amp_overflow"]) == [0.0, 1.0, 0.0]
    assert list(trace.steps["skipped"]) == [False, True, False]


@pytest.mark.parametrize("unscale", [False, True], ids=["still-scaled", "unscaled-by-the-loop"])
def test_logged_gradient_norm_is_in_true_units(tmp_path, unscale):
    """An ordinary AMP loop (no unscale_) and one that unscales before the check both log the true norm."""
    trace = _run(tmp_path / "run", torch.amp.GradScaler("cpu", init_scale=SCALE), unscale=unscale)
    norms = list(trace.steps["grad/_total"])
    assert norms == pytest.approx([_true_grad_norm()] * 3, rel=1e-5)
    assert list(trace.steps["amp_scale"]) == [SCALE] * 3


def test_low_scale_for_collapse_steps_is_one_incident(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=0.5, growth_interval=1000)
    trace = _run(tmp_path / "run", scaler, steps=12, cfg=MonitorConfig(policy="observe", amp_collapse_steps=4))
    (collapse,) = _events(trace, "amp_scale_collapse")
    assert collapse["step"] == 3 and collapse["severity"] == "error" and collapse["data"]["scale"] == 0.5
    assert "collapsed to 0.5 (below 1 for 4 consecutive steps" in collapse["message"]
    assert trace.summary["status"] == "nonfinite"
    assert (trace.run_dir / "capsules" / "step_000003.pt").is_file()


def test_healthy_scale_never_collapses(tmp_path):
    trace = _run(tmp_path / "run", torch.amp.GradScaler("cpu", init_scale=1.0), steps=5,
                 cfg=MonitorConfig(policy="observe", amp_collapse_steps=2))
    assert not _events(trace, "amp_scale_collapse") and trace.summary["status"] == "clean"


def test_unsampled_steps_are_classified_when_read(tmp_path):
    """Under observe with every=4 a step that is not sampled reads nothing: its overflow is recorded when the next
    sampled step reads (the same event, marked late; the step counted skipped), and a collapse of the scale there
    is the same incident, without a capsule (its state is gone)."""
    cfg = MonitorConfig(policy="observe", every=4)
    trace = _run(tmp_path / "a", torch.amp.GradScaler("cpu", init_scale=SCALE), steps=6, nan_step=1, cfg=cfg)
    (overflow,) = _events(trace, "amp_overflow")
    assert overflow["step"] == 1 and overflow["data"]["late"] is True and overflow["data"]["scale"] == SCALE
    assert trace.summary["amp_overflow_steps"] == [1] and trace.summary["skipped_steps"] == [1]
    assert trace.summary["status"] == "clean" and trace.summary["nonfinite_steps"] == []
    assert [e["step"] for e in _events(trace, "step_skipped")] == [1]
    scaler = torch.amp.GradScaler("cpu", init_scale=0.5, growth_interval=1000)
    trace = _run(tmp_path / "b", scaler, steps=8, cfg=MonitorConfig(policy="observe", every=4, amp_collapse_steps=3))
    (collapse,) = _events(trace, "amp_scale_collapse")
    assert collapse["step"] == 2 and collapse["data"]["late"] is True and collapse["data"]["scale"] == 0.5
    assert "collapsed to 0.5 (below 1 for 3 consecutive steps" in collapse["message"]
    assert trace.summary["status"] == "nonfinite" and not (trace.run_dir / "capsules").exists()


def test_scale_watch_counts_consecutive_low_steps_only():
    watch = amp.ScaleWatch(collapse_below=1.0, collapse_steps=3)
    assert [watch.observe(s, 0.5, False) for s in range(2)] == [False, False]
    assert watch.observe(2, 1.0, True) is False  # back at 1: the count restarts
    assert watch.low_run == 0 and watch.overflow_steps == [2]
    assert [watch.observe(s, 0.25, False) for s in (3, 4)] == [False, False]
    assert watch.observe(5, math.inf, True) is True and watch.collapsed_at == 5  # a non-finite scale is low too
    assert watch.observe(6, 0.1, False) is False  # exactly once
    assert watch.collapsed_at == 5 and watch.low_run == 4
    text = watch.describe(0.1)
    assert text == ("GradScaler scale collapsed to 0.1 (below 1 for 4 consecutive steps; 2 overflow steps so far): "
                    "the gradients are non-finite at any scale, so this is a real fault, not fp16 overflow")


def test_scale_watch_defaults():
    watch = amp.ScaleWatch()
    assert [watch.observe(s, 0.99, False) for s in range(10)] == [False] * 9 + [True]
    assert watch.collapsed_at == 9


class _LookAlike:
    """A GradScaler look-alike with no ``_scale`` tensor and no ``is_enabled``."""

    def __init__(self, scale: float = 8.0):
        self._value = scale

    def scale(self, loss):
        return loss * self._value

    def get_scale(self) -> float:
        return self._value


def test_is_scaler_and_scale_tensor():
    enabled, disabled = torch.amp.GradScaler("cpu", init_scale=SCALE), torch.amp.GradScaler("cpu", enabled=False)
    assert amp.is_scaler(enabled) is True and amp.is_scaler(disabled) is False
    assert amp.is_scaler(_LookAlike()) is True and amp.is_scaler(None) is False and amp.is_scaler(object()) is False
    only_get_scale = type("OnlyGetScale", (), {"get_scale": lambda self: 1.0})()
    assert amp.is_scaler(only_get_scale) is False  # no scale(): not a scaler, and no error
    enabled.scale(torch.ones(()))  # the scale tensor is made lazily
    scale = amp.scale_tensor(enabled)
    assert isinstance(scale, torch.Tensor) and scale.dim() == 0 and float(scale) == SCALE  # no read in it
    assert amp.scale_tensor(_LookAlike(3.0)) == 3.0


def _unscale_state(grad_value: float, optimizers: int = 1):
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    opts = []
    for k in range(optimizers):
        p = nn.Parameter(torch.ones(2))
        p.grad = torch.full((2,), grad_value if k == optimizers - 1 else 1.0)
        opts.append(torch.optim.SGD([p], lr=0.1))
    scaler.scale(torch.ones(()))
    return scaler, opts


def test_unscaled_and_found_inf_follow_unscale():
    scaler, (opt,) = _unscale_state(1.0)
    assert amp.unscaled(scaler, [opt]) is False and amp.found_inf(scaler, [opt]) is None  # before unscale_
    assert amp.unscaled(scaler, []) is False
    scaler.unscale_(opt)
    assert amp.unscaled(scaler, [opt]) is True and amp.found_inf(scaler, [opt]) is False
    other = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    assert amp.unscaled(scaler, [opt, other]) is False  # one optimizer not unscaled yet
    scaler, opts = _unscale_state(math.inf, optimizers=2)
    for o in opts:
        scaler.unscale_(o)
    assert amp.unscaled(scaler, opts) is True and amp.found_inf(scaler, opts) is True
    assert amp.found_inf(scaler, opts[:1]) is False  # only the second optimizer overflowed
    assert amp.found_inf(scaler, opts[::-1]) is True  # the overflowing one first: a later clean one keeps it
    assert amp.found_inf(_LookAlike(), opts) is None and amp.unscaled(_LookAlike(), opts) is False
    bare = _LookAlike()
    bare._per_optimizer_states = {id(o): {} for o in opts}  # a look-alike's state without a stage
    assert amp.unscaled(bare, opts) is False and amp.found_inf(bare, opts) is None


def test_scaler_spy_sees_the_scaler_and_the_true_loss():
    original_scale, original_step = torch.amp.GradScaler.scale, torch.amp.GradScaler.step
    steps = []
    spy = ScalerSpy(on_step=lambda scaler, opt: steps.append((scaler, opt)))
    fresh = torch.ones(())
    assert spy.scaler is None and not spy.installed and spy.true_loss(fresh) is fresh  # nothing seen yet
    assert spy.install() is spy and spy.installed and spy.install() is spy
    try:
        assert torch.amp.GradScaler.scale is not original_scale
        assert torch.amp.GradScaler.scale.__wrapped__ is original_scale
        assert torch.amp.GradScaler.step.__wrapped__ is original_step
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        p = nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([p], lr=0.1)
        loss = (p * 3).sum()
        scaled = scaler.scale(loss)
        assert spy.scaler is scaler and float(scaled.detach()) == 6 * SCALE
        other = loss * 2
        assert spy.true_loss(other) is other  # not the scaled loss: returned as is (and the pair is used up)
        scaled = scaler.scale(loss)
        assert spy.true_loss(scaled) is loss
        assert spy.true_loss(scaled) is scaled  # used once
        scaled.backward()
        scaler.step(opt)
        assert steps == [(scaler, opt)]
        assert float(p.detach()[0]) == pytest.approx(1 - 0.1 * 3)  # the wrapped step still steps (unscaled gradient)
        assert scaler.scale([loss]) is not None and spy.true_loss(loss) is loss  # a list: not a pair
    finally:
        spy.remove()
    assert torch.amp.GradScaler.scale is original_scale and torch.amp.GradScaler.step is original_step
    assert not spy.installed
    spy.remove()  # twice: harmless
    assert torch.amp.GradScaler.scale is original_scale


def test_scaler_spy_passes_step_arguments_through_and_notes_the_scaler(tmp_path):
    """A disabled scaler's step is optimizer.step(*args, **kwargs): a closure reaches the optimizer either way."""
    spy = ScalerSpy().install()
    try:
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        p = nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([p], lr=0.1)
        calls = []

        def closure():
            calls.append(1)
            opt.zero_grad()
            loss = (p * 2).sum()
            loss.backward()
            return loss.detach()

        assert float(scaler.step(opt, closure)) == 4.0 and spy.scaler is scaler  # step alone makes it known
        assert float(scaler.step(opt, closure=closure)) == pytest.approx(3.2)  # at p = 0.8 after the first step
        assert calls == [1, 1]
    finally:
        spy.remove()


def test_a_failing_step_listener_is_switched_off_not_raised(tmp_path):
    events = []
    guard.bind(tmp_path, lambda kind, severity, message, **data: events.append((kind, data["part"])))
    spy = ScalerSpy(on_step=lambda scaler, opt: 1 / 0).install()
    try:
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        p = nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        scaler.step(torch.optim.SGD([p], lr=0.5))
        assert torch.equal(p.detach(), torch.full((2,), 0.5))  # the optimizer stepped regardless
        assert [e["part"] for e in guard.errors()] == ["scaler.step"] and events == [("instrument_error", "scaler.step")]
    finally:
        spy.remove()
        guard.unbind()
