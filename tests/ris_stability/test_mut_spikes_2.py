"""The monitor's explosion checks as a run records them (monitor/explosions.py): the explosion_origin event written
once, the trace-back read once, a skipped update never blamed, and no trace-back words where nothing grew."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.instruments.explosion import ExplosionDetector, Growth
from ris_stability.instruments.grads import GradMonitor
from ris_stability.numerics.tolerances import explosion_norm_limit
from ris_stability.records import read_trace

from tests.ris_stability.test_mut_spikes import _explosion_events, _linear_and_grads, _observe


def _run(path, model, opt, x, steps: int, loss_fn, config: MonitorConfig | None = None, crash_at: int | None = None):
    monitor = StabilityMonitor(path, config or MonitorConfig())
    with MonitorSession(monitor, model, opt) as s:
        for step in range(steps):
            s.start_step(step, batch={"x": x})
            if step == crash_at:
                raise RuntimeError("input tensor should not contain infs or NaNs")
            loss = loss_fn(model(x))
            s.after_forward(loss)
            opt.zero_grad()
            loss.backward()
            if s.after_backward():
                opt.step()
            s.end_step()
    return monitor


def _quartic(path, crash_at: int | None = None) -> StabilityMonitor:
    """SGD at lr 3e-3 on a quartic loss: gradient 6e3 -> 2e5 -> 5e17, the update of step 2 sends the first layer's
    parameters from 437 to 1e15 and the loss is inf from step 3 on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=3e-3)
    return _run(path, model, opt, torch.randn(32, 8), 6 if crash_at is None else crash_at + 1,
                lambda y: (y - 10.0).pow(4).mean(), crash_at=crash_at)


def test_the_origin_of_a_nonfinite_loss_is_one_event_and_one_read(tmp_path, monkeypatch):
    reads = []
    original = GradMonitor.param_norms
    monkeypatch.setattr(GradMonitor, "param_norms", lambda self: reads.append(1) or original(self))
    with pytest.raises(RuntimeError, match="should not contain infs"):
        _quartic(tmp_path / "run", crash_at=5)
    events = read_trace(tmp_path / "run").events
    origin = "parameters of 0 grew from 437 to 1.18e+15 at the update of step 2, gradient norm 5.13e+17 = 8.58e+13x " \
             "its first value"
    (event,) = [e for e in events if e["kind"] == "explosion_origin"]  # written once, at the first non-finite step
    assert event["message"] == "step 3 went non-finite after an explosion: " + origin
    assert (event["step"], event["data"]["failed_step"], event["data"]["update_step"]) == (2, 3, 2)
    losses = {e["step"]: e["message"] for e in events if e["kind"] == "nonfinite_loss"}
    assert losses[3] == "non-finite loss at step 3; " + origin and losses[4] == "non-finite loss at step 4"
    (stopped,) = [e for e in events if e["kind"] == "run_stopped"]
    assert stopped["message"] == "RuntimeError: input tensor should not contain infs or NaNs; " + origin
    assert len(reads) == 1  # the parameters are read once, when the run has gone wrong, and the origin kept


def test_no_trace_back_words_where_no_update_grew_the_parameters(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(RuntimeError):
        _run(tmp_path / "run", model, opt, torch.randn(16, 4), 3,
             lambda y: y.mean() * torch.tensor(float("nan")), crash_at=2)
    events = read_trace(tmp_path / "run").events
    assert [e["message"] for e in events if e["kind"] == "nonfinite_loss"] == ["non-finite loss at step 0",
                                                                               "non-finite loss at step 1"]
    assert [e["message"] for e in events if e["kind"] == "run_stopped"] == [
        "RuntimeError: input tensor should not contain infs or NaNs"]
    assert not [e for e in events if e["kind"] == "explosion_origin"]


def test_a_skipped_update_is_never_blamed(tmp_path):
    """on_explosion='skip' keeps the parameters at the logged steps 0 and 2; they grow at the unlogged step 1,
    which no logged step's update covers: no update is named (not step 0's, which did not run)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=50.0)
    monitor = _run(tmp_path / "run", model, opt, torch.randn(16, 4), 3, lambda y: (y - 10.0).pow(2).mean(),
                   MonitorConfig(every=2, on_explosion="skip"))
    assert monitor.skipped_steps == [0, 2] and monitor.explosion_steps == [0, 2]
    assert float(model.bias.detach().norm()) > 500  # grown 5000x by the update of step 1
    assert monitor.update_origin() is None


# -- the trace-back rule (instruments/explosion.py) ------------------------------------------------------------------
def _records(*params: dict, skipped=frozenset(), now: dict, dtype=torch.float32):
    det = ExplosionDetector(dtype)
    for step, p in enumerate(params):
        _observe(det, step, 1.0, params=p)
    return det.trace_back(now, skipped)


def test_trace_back_names_the_largest_growth_and_the_earliest_of_equals():
    # step 1 grows b 1e6x; its module a (2x) is checked first and is no reason to stop looking
    origin = _records({"w": 1.0}, {"w": 1000.0, "a": 1.0, "b": 1.0}, now={"w": 1000.0, "a": 2.0, "b": 1e6})
    assert (origin.module, origin.step, origin.before, origin.after) == ("b", 1, 1.0, 1e6)
    equal = _records({"w": 1.0}, {"w": 1000.0}, now={"w": 1e6})  # two 1000x updates: the first is named
    assert (equal.step, equal.next_step, equal.after) == (0, 1, 1000.0)
    skipped = _records({"w": 1.0}, {"w": 1.0}, {"w": 1.0}, skipped={0}, now={"w": 500.0})
    assert (skipped.step, skipped.next_step) == (2, None)  # a skipped step is passed over, not the end of the search


def test_trace_back_ignores_the_total_and_modules_gone_since():
    origin = _records({"_total": 1.0, "w": 1.0, "gone": 1.0}, now={"_total": 1000.0, "w": 1000.0})
    assert origin.module == "w" and origin.after == 1000.0


def test_trace_back_range_limits():
    limit = explosion_norm_limit(torch.float32)
    for after in (2e19, math.inf, math.nan):  # from zero: beyond the range, inf or NaN counts
        assert _records({"zero": 0.0}, now={"zero": after}).module == "zero"
    assert _records({"zero": 0.0}, now={"zero": limit}) is None  # exactly the limit is in range
    assert _records({"w": limit / 2}, now={"w": limit}) is None  # 2x growth to the limit: nothing to name
    # parameters already beyond the range are named even when this update shrank them; a layer grown from zero
    # to a finite norm in range is not a growth
    origin = _records({"zero": 0.0, "big": 2e20}, now={"zero": 5.0, "big": 1e20})
    assert (origin.module, origin.before, origin.after) == ("big", 2e20, 1e20)


def test_explosion_data_in_full():
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 2.0, modules={"enc": 1.0}, sites={"s": 1.0})
    v = _observe(det, 1, 4e7, modules={"enc": 3e7}, sites={"s": 100.0}, update_ratio=2.0, has_baseline=True)
    assert v.data() == {"total": 4e7, "previous": 2.0, "first": 2.0, "rules": ["growth", "update"],
                        "catastrophic": True, "limit": explosion_norm_limit(torch.float32), "update_ratio": 2.0,
                        "modules": [{"name": "enc", "value": 3e7, "previous": 1.0}],
                        "sites": [{"name": "s", "value": 100.0, "previous": 1.0}], "names": ["enc", "s"]}


# -- the SGD update rule through the monitor (monitor/explosions.py) -------------------------------------------------
def test_the_sgd_update_rule_over_several_optimizers_and_tensor_learning_rates(tmp_path):
    model, _, (gw, gb) = _linear_and_grads()
    weight = math.sqrt(sum(float(p.detach().square().sum()) for p in model.parameters()))
    expected = math.sqrt((50.0 * float(gw.norm())) ** 2 + (5.0 * float(gb.norm())) ** 2) / weight
    (two,) = _explosion_events(tmp_path / "two", lambda m: [torch.optim.SGD([m.weight], lr=50.0),
                                                           torch.optim.SGD([m.bias], lr=5.0)])
    assert two["data"]["rules"] == ["update"] and two["data"]["update_ratio"] == pytest.approx(expected, rel=1e-5)
    (tensor,) = _explosion_events(tmp_path / "tensor", lambda m: [torch.optim.SGD(m.parameters(), lr=torch.tensor(50.0))])
    assert tensor["data"]["update_ratio"] == pytest.approx(50.0 * math.hypot(gw.norm(), gb.norm()) / weight, rel=1e-5)
    # an adaptive optimizer beside SGD: the update is not lr * g, the rule says nothing
    assert _explosion_events(tmp_path / "mixed", lambda m: [torch.optim.SGD([m.weight], lr=50.0),
                                                         torch.optim.Adam([m.bias], lr=50.0)]) == []


# -- the explosion rules at their edges (instruments/explosion.py) ---------------------------------------------------
def test_a_norm_exactly_at_the_range_limit_is_in_range():
    det = ExplosionDetector(torch.float32)
    assert _observe(det, 0, explosion_norm_limit(torch.float32)) is None
    assert _observe(ExplosionDetector(torch.float32), 0, explosion_norm_limit(torch.float32) * 1.001).rules == ("range",)


def test_modules_named_in_a_range_verdict_without_a_10x_growth():
    """Beyond the range with no module grown 10x: the modules beyond the range themselves are named."""
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1e19, modules={"a": 1e19, "b": 1.0})
    v = _observe(det, 1, 2e19, modules={"a": 2e19, "b": 1.5})
    assert v.rules == ("range",) and [g.name for g in v.modules] == ["a"]
    assert v.message().endswith("beyond float32's range for a norm (1.84e+19: its square overflows); grew most: "
                                "module a (2e+19, x2)")


def test_nonfinite_module_norms_are_neither_named_nor_kept():
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1.0, modules={"a": 1.0, "b": 1.0, "c": 1.0})
    _observe(det, 1, 1.0, modules={"a": math.nan, "b": 1.0, "c": 1.0})  # a's NaN is not its previous value
    v = _observe(det, 2, 1e7, modules={"a": 50.0, "b": 10.0, "c": math.inf, "new": 0.0})
    # a: x50 against step 0; b: exactly 10x is not more; c: inf is the non-finite checks' business; new: zero
    assert [(g.name, g.previous) for g in v.modules] == [("a", 1.0)]
    assert v.message().endswith("grew most: module a (50, x50)")


# -- warnings, policies and the spike rule's baseline through a session (monitor/explosions.py) ----------------------
def _scaled_run(path, scales, on_explosion: str):
    """A linear model whose loss is scaled per step (an unnormalised batch): the gradient grows by the same factor."""
    torch.manual_seed(0)
    model, x = nn.Linear(4, 1), torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    monitor, stops = StabilityMonitor(path, MonitorConfig(on_explosion=on_explosion)), []
    with MonitorSession(monitor, model, opt) as s:
        for step, scale in enumerate(scales):
            s.start_step(step, batch={"x": x})
            loss = model(x).square().mean() * scale
            s.after_forward(loss)
            opt.zero_grad()
            loss.backward()
            if s.after_backward():
                opt.step()
            stops.append(s.stop_requested)
            s.end_step()
    events = [e for e in read_trace(path).events if e["kind"] in ("gradient_explosion", "gradient_spike")]
    return monitor, events, stops


def test_an_early_growth_is_a_warning_that_skips_nothing(tmp_path):
    monitor, (event,), _ = _scaled_run(tmp_path / "run", [1.0, 200.0, 1.0], "skip")
    assert (event["kind"], event["severity"], event["step"], event["data"]["rules"]) == (
        "gradient_explosion", "warning", 1, ["early_growth"])
    assert event["message"].startswith("gradient growth at step 1: total grad norm 180 (200x the previous logged")
    assert monitor.explosion_steps == [1] and monitor.skipped_steps == []


def test_after_the_spike_baseline_a_200x_growth_is_a_spike_not_an_early_growth(tmp_path):
    monitor, (event,), _ = _scaled_run(tmp_path / "run", [1.0] * 6 + [200.0], "skip")
    assert (event["kind"], event["step"]) == ("gradient_spike", 6) and monitor.explosion_steps == []


def test_stop_asks_the_loop_to_stop_with_the_verdict(tmp_path):
    monitor, (event,), stops = _scaled_run(tmp_path / "run", [1.0, 1e7], "stop")
    assert event["severity"] == "error" and event["data"]["policy"] == "stop"
    assert event["message"].endswith("; run stopped before the update (on_explosion='stop')")
    assert stops == ["", event["message"]] and monitor.skipped_steps == [1]


def test_no_update_rule_for_zero_weights_or_without_an_optimizer(tmp_path):
    """A zero-initialised model has no norm to compare the update with; a session without an optimizer has no
    update: neither is judged by the update rule (the growth rules still are)."""
    def events(path, opt_of):
        torch.manual_seed(0)
        model, x = nn.Linear(4, 1), torch.randn(16, 4)
        nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
        opt = opt_of(model)
        with MonitorSession(StabilityMonitor(path), model, opt) as s:
            s.start_step(0)
            loss = (model(x) - 1.0).square().mean()
            s.after_forward(loss)
            loss.backward()
            if s.after_backward() and opt is not None:
                opt.step()
            s.end_step()
        return [e for e in read_trace(path).events if e["kind"] == "gradient_explosion"]

    assert events(tmp_path / "zero", lambda m: torch.optim.SGD(m.parameters(), lr=100.0)) == []
    assert events(tmp_path / "none", lambda m: None) == []


def test_a_module_whose_gradient_was_zero_has_grown_without_bound():
    assert Growth("dead", 0.5, 0.0).ratio == math.inf  # below 1 too: any gradient after none
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1.0, modules={"dead": 0.0, "a": 1.0})
    v = _observe(det, 1, 1e7, modules={"dead": 0.5, "a": 2.0})
    assert [g.name for g in v.modules] == ["dead"] and v.message().endswith("grew most: module dead (0.5)")


def test_at_the_first_step_every_module_with_a_gradient_is_named_largest_first():
    v = _observe(ExplosionDetector(torch.float32), 0, 1e20, modules={"small": 0.5, "big": 1e20, "none": 0.0})
    assert [g.name for g in v.modules] == ["big", "small"]
    assert v.message().endswith("largest: module big (1e+20), module small (0.5)")


def test_grown_modules_by_growth_and_new_ones_by_size():
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1.0, modules={"a": 1.0, "b": 1000.0})
    v = _observe(det, 1, 1e7, modules={"a": 1000.0, "b": 50000.0})
    assert [g.name for g in v.modules] == ["a", "b"]  # x1000 before x50, though b is larger
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1.0, modules={"a": 1.0})
    v = _observe(det, 1, 1e7, modules={"a": 100.0, "new": 1000.0})
    assert [g.name for g in v.modules] == ["new", "a"]  # a series without a previous value: all by size


def test_a_module_exactly_at_the_range_limit_is_not_named():
    det, limit = ExplosionDetector(torch.float32), explosion_norm_limit(torch.float32)
    _observe(det, 0, 1e19, modules={"a": limit})
    v = _observe(det, 1, 2e19, modules={"a": limit}, has_baseline=True)
    assert v.rules == ("range",) and v.modules == ()
    assert v.message().endswith("beyond float32's range for a norm (1.84e+19: its square overflows)")


def test_direct_use_of_the_detector():
    """Without has_baseline the detector assumes no spike baseline (early growth warns); a detector whose first
    logged step is not 0 (a resumed run) states no comparison."""
    det = ExplosionDetector()
    assert det.observe(0, 1.0, {}) is None and det.observe(1, 500.0, {}).rules == ("early_growth",)
    resumed = ExplosionDetector().observe(100, 1e20, {"a": 1e20})
    assert resumed.message() == ("gradient explosion at step 100: total grad norm 1e+20: beyond float32's range for a "
                                 "norm (1.84e+19: its square overflows); largest: module a (1e+20)")


def test_an_explosion_message_names_at_most_four_modules_and_four_sites():
    names = {f"m{k}": 10.0 ** (20 - k) for k in range(5)}
    v = _observe(ExplosionDetector(torch.float32), 0, 1e20, modules=names, sites={f"s{k}": 5.0 - k for k in range(5)})
    assert len(v.modules) == len(v.sites) == 5
    msg = v.message()
    assert msg.count("module ") == 4 and "m4" not in msg and msg.count("linalg site ") == 4 and "s4" not in msg
