"""Gradient spikes and explosions as a user meets them: which step is a spike, against which baseline, which modules
and sites are named and in which order (instruments/spikes.py), and the explosion verdicts, their words and the
trace-back of a crash (instruments/explosion.py)."""
from __future__ import annotations

import math

import pytest
import torch

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.instruments.explosion import (CATASTROPHIC_GROWTH, EARLY_GROWTH, Explosion, ExplosionDetector,
                                                  Growth, UpdateOrigin)
from ris_stability.instruments.spikes import Jump, Spike, SpikeConfigError, SpikeDetector
from ris_stability.records import read_trace


def _warm(det: SpikeDetector, values, modules=None, sites=None, start: int = 0) -> int:
    for step, v in enumerate(values, start):
        assert det.observe(step, v, modules or {}, sites) is None
    return start + len(values)


# -- spikes -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.inf, math.nan, -math.inf])
def test_nonfinite_norms_never_enter_the_baseline(bad):
    det = SpikeDetector(factor=10.0, window=20, warmup=5)
    step = _warm(det, [1.0] * 6, {"a": 1.0})
    step = _warm(det, [bad] * 11, {"a": bad}, start=step)  # the non-finite checks' business, not a spike
    assert det.threshold("_total") == pytest.approx(10.0)
    spike = det.observe(step, 100.0, {"a": 100.0})
    assert spike is not None and spike.step == step and spike.total.baseline == 1.0 and spike.total.ratio == 100
    assert [(j.name, j.baseline) for j in spike.modules] == [("a", 1.0)]


def test_jumps_are_ranked_largest_first_and_only_jumped_series_are_named():
    det = SpikeDetector(factor=10.0, window=20, warmup=5)
    base = {"a": 1.0, "b": 1.0, "c": 1.0, "quiet": 1.0}
    step = _warm(det, [1.0] * 5, base, {"s1": 2.0, "s2": 2.0})
    spike = det.observe(step, 100.0, {"a": 20.0, "b": 50.0, "c": 30.0, "quiet": 2.0, "new": 99.0},
                        {"s1": 40.0, "s2": 400.0})
    assert [j.name for j in spike.modules] == ["b", "c", "a"]  # x50, x30, x20; "quiet" x2 and "new" (no baseline) not
    assert [j.name for j in spike.sites] == ["s2", "s1"]
    assert [j.ratio for j in spike.modules] == [50.0, 30.0, 20.0]
    assert spike.total == Jump("total", 100.0, 1.0)
    msg = spike.message()
    assert msg == ("gradient spike at step 5: total grad norm 100 = 100x its running median 1; jumped: module b "
                   "(50, x50), module c (30, x30), module a (20, x20), linalg site s2 (400, x200), "
                   "linalg site s1 (40, x20)")
    assert spike.data() == {"total": 100.0, "baseline": 1.0, "factor": 10.0,
                            "modules": [{"name": n, "value": v, "baseline": 1.0} for n, v in
                                        (("b", 50.0), ("c", 30.0), ("a", 20.0))],
                            "sites": [{"name": "s2", "value": 400.0, "baseline": 2.0},
                                      {"name": "s1", "value": 40.0, "baseline": 2.0}],
                            "names": ["b", "c", "a", "s2", "s1"]}


def test_message_lists_at_most_four_of_each_and_says_when_none_jumped():
    det = SpikeDetector(factor=10.0, window=20, warmup=5)
    names = [f"m{k}" for k in range(6)]
    step = _warm(det, [1.0] * 5, {n: 1.0 for n in names})
    spike = det.observe(step, 50.0, {n: 20.0 + k for k, n in enumerate(names)})
    assert len(spike.modules) == 6 and spike.message().count("module ") == 4
    assert "module m5 (25, x25)" in spike.message() and "m1 " not in spike.message()
    alone = det.observe(step + 1, 500.0, {n: 1.0 for n in names})
    assert alone.message().endswith("; no single module or site jumped alone") and alone.modules == ()


def test_threshold_is_the_larger_of_the_median_and_the_spread_rules():
    det = SpikeDetector(factor=10.0, window=20, warmup=5)
    assert det.threshold("_total") is None
    step = _warm(det, [1.0, 5.0, 1.0, 5.0, 1.0, 5.0, 3.0])  # median 3, MAD 2: 3 + 10 * 1.4826 * 2
    assert det.threshold("_total") == pytest.approx(32.652)
    assert det.observe(step, 32.0, {}) is None  # above 10x the median, but within the spread
    # now median 4, MAD 2: the limit is max(40, 33.7)
    assert det.threshold("_total") == pytest.approx(40.0) and det.observe(step + 1, 41.0, {}).total.baseline == 4.0
    quiet = SpikeDetector(factor=4.0, window=20, warmup=5)
    _warm(quiet, [2.0] * 5)
    assert quiet.threshold("_total") == 8.0
    assert quiet.observe(5, 8.0, {}) is None and quiet.observe(6, 8.01, {}) is not None


def test_warmup_and_window():
    det = SpikeDetector(factor=10.0, window=5, warmup=3)
    assert det.observe(0, 1.0, {}) is None and det.observe(1, 1.0, {}) is None
    assert det.observe(2, 1e9, {}) is None  # two values: no baseline yet
    assert det.threshold("_total") is not None  # three values now
    det = SpikeDetector(factor=10.0, window=5, warmup=3)
    step = _warm(det, [100.0] * 5 + [1.0] * 5)  # the window keeps the last five: a baseline of 1
    assert det.threshold("_total") == pytest.approx(10.0)
    assert det.observe(step, 50.0, {}).total.baseline == 1.0


def test_jump_ratio_against_a_zero_baseline():
    assert Jump("x", 1.0, 0.0).ratio == math.inf and Jump("x", 6.0, 2.0).ratio == 3.0
    det = SpikeDetector(factor=10.0, window=20, warmup=5)
    step = _warm(det, [0.0] * 5)
    spike = det.observe(step, 1e-3, {})
    assert spike is not None and "inf" in spike.message()


@pytest.mark.parametrize("kwargs", [{"factor": 1.0}, {"warmup": 1}, {"window": 4, "warmup": 5}])
def test_settings_that_cannot_define_a_baseline(kwargs):
    with pytest.raises(SpikeConfigError, match="factor=10, window=50, warmup=5"):
        SpikeDetector(**kwargs)


def test_smallest_valid_settings():
    det = SpikeDetector(factor=1.5, window=2, warmup=2)
    _warm(det, [1.0, 1.0])
    assert det.observe(2, 1.6, {}) is not None
    assert SpikeDetector().factor == 10.0 and SpikeDetector().window == 50 and SpikeDetector().warmup == 5


def test_series_names_keep_their_own_slashes():
    det = SpikeDetector(factor=10.0, window=20, warmup=5)
    step = _warm(det, [1.0] * 5, {"enc/0": 1.0}, {"loss:linalg.eig/x": 1.0})
    spike = det.observe(step, 100.0, {"enc/0": 100.0}, {"loss:linalg.eig/x": 100.0})
    assert isinstance(spike, Spike) and spike.modules[0].name == "enc/0"
    assert spike.sites[0].name == "loss:linalg.eig/x"


# -- explosions ---------------------------------------------------------------------------------------------------
def _observe(det: ExplosionDetector, step: int, total: float, **kw):
    return det.observe(step, total, kw.pop("modules", {}), kw.pop("sites", None), kw.pop("params", None),
                       kw.pop("update_ratio", None), kw.pop("has_baseline", False))


def test_growth_limits_are_strict():
    det = ExplosionDetector(torch.float32)
    assert _observe(det, 0, 1.0) is None
    assert _observe(det, 1, EARLY_GROWTH) is None  # exactly 100x: not more
    assert _observe(det, 2, EARLY_GROWTH * EARLY_GROWTH * 1.01).rules == ("early_growth",)
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1.0)
    assert _observe(det, 1, CATASTROPHIC_GROWTH, has_baseline=True) is None
    verdict = _observe(det, 2, CATASTROPHIC_GROWTH ** 2 * 1.01 / 1e6, has_baseline=True)
    assert verdict is None or verdict.rules != ("early_growth",)


def test_an_explosion_verdict_in_words_and_data():
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 2.0, modules={"enc": 1.0, "head": 1.0, "flat": 1.0}, sites={"s": 1.0})
    _observe(det, 1, 4.0, modules={"enc": 2.0, "head": 1.0, "flat": 1.0}, sites={"s": 1.0})
    v = _observe(det, 2, 4e7, modules={"enc": 3e7, "head": 50.0, "flat": 1.5}, sites={"s": 100.0},
                 update_ratio=2.0, has_baseline=True)
    assert isinstance(v, Explosion) and v.catastrophic and v.rules == ("growth", "update")
    assert (v.previous, v.first, v.dtype) == (4.0, 2.0, "float32")
    assert [g.name for g in v.modules] == ["enc", "head"] and [g.name for g in v.sites] == ["s"]
    assert v.message() == ("gradient explosion at step 2: total grad norm 4e+07 (1e+07x the previous logged step's 4, "
                           "2e+07x its first logged value 2): grew more than 1e+06x in one logged step; the SGD "
                           "update lr*g would change the parameters by 2x their own norm; grew most: module enc "
                           "(3e+07, x1.5e+07), module head (50, x50), linalg site s (100, x100)")
    data = v.data()
    assert data["rules"] == ["growth", "update"] and data["names"] == ["enc", "head", "s"]
    assert data["modules"][0] == {"name": "enc", "value": 3e7, "previous": 2.0} and data["update_ratio"] == 2.0


def test_an_early_growth_warning_and_the_first_step():
    det = ExplosionDetector(torch.float32)
    first = _observe(det, 0, 1e20, modules={"a": 1e20, "b": 3.0})
    assert first.rules == ("range",) and first.catastrophic
    assert [g.name for g in first.modules] == ["a", "b"]  # first step: the largest first
    assert first.message().startswith("gradient explosion at step 0: total grad norm 1e+20: beyond float32's range")
    assert "largest: module a (1e+20), module b (3)" in first.message()
    det = ExplosionDetector(torch.float64)
    _observe(det, 0, 1.0, modules={"a": 1.0})
    warn = _observe(det, 1, 500.0, modules={"a": 500.0})
    assert warn.rules == ("early_growth",) and not warn.catastrophic
    assert warn.message().startswith("gradient growth at step 1: total grad norm 500")
    assert "grew more than 100x in one logged step" in warn.message()
    assert det.first_grad() == 1.0


def test_nonfinite_steps_are_left_to_the_nonfinite_checks_and_keep_no_growth():
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1.0)
    assert _observe(det, 1, math.inf) is None and _observe(det, 2, math.nan) is None
    assert _observe(det, 3, 50.0) is None  # against 1.0: the non-finite steps were not kept
    assert _observe(det, 4, 50.0 * 150).rules == ("early_growth",)


def test_growth_ordering_by_ratio_then_size():
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1.0, modules={"small": 1.0, "big": 10.0, "most": 1.0, "calm": 1.0})
    v = _observe(det, 1, 1e7, modules={"small": 100.0, "big": 1000.0, "most": 1e6, "calm": 5.0})
    assert [g.name for g in v.modules] == ["most", "big", "small"]  # x1e6, then x100 by size; calm (x5) not named
    assert Growth("g", 5.0, 0.0).ratio == math.inf and Growth("g", 0.0, 0.0).ratio == 1.0
    assert math.isnan(Growth("g", 5.0, None).ratio) and Growth("g", 5.0, None).text("module") == "module g (5)"


def test_update_ratio_at_the_limit_is_fine():
    assert _observe(ExplosionDetector(), 0, 1.0, update_ratio=1.0) is None
    assert _observe(ExplosionDetector(), 0, 1.0, update_ratio=1.01).rules == ("update",)


def test_trace_back_through_unlogged_steps_and_from_zero():
    det = ExplosionDetector(torch.float32)
    for step, (w, grad) in [(0, (1.0, 1.0)), (5, (2.0, 2.0)), (10, (500.0, 3.0))]:
        _observe(det, step, grad, params={"w": w, "zero": 0.0, "_total": w})
    origin = det.trace_back({"w": 600.0, "zero": 0.0})
    assert isinstance(origin, UpdateOrigin) and (origin.step, origin.next_step) == (5, 10)
    assert (origin.before, origin.after, origin.grad) == (2.0, 500.0, 2.0)
    assert origin.message() == ("parameters of w grew from 2 to 500 between steps 5 and 10 (not every step was "
                                "logged), gradient norm 2 = 2x its first value")
    assert origin.data()["update_step"] == 5 and origin.data()["origin"] == origin.message()
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1.0, params={"zero": 0.0, "_total": 1.0})
    origin = det.trace_back({"zero": math.inf})  # from zero: only an out-of-range result counts
    assert origin.module == "zero" and origin.next_step is None and "at the update of step 0" in origin.message()
    assert "x its first value" not in origin.message()
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1.0, params={"zero": 0.0, "_total": 1.0})
    assert det.trace_back({"zero": 5.0}) is None
    assert ExplosionDetector().trace_back({"w": 1.0}) is None
    det = ExplosionDetector(torch.float32)
    _observe(det, 0, 1.0, params={"w": 1.0, "_total": 1.0})
    assert det.trace_back({"w": 100.0}) is None and det.trace_back({"w": 101.0}).after == 101.0


# -- through the monitor: the SGD update rule from step 0 -----------------------------------------------------------
def _linear_and_grads():
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 3), torch.randn(8, 4)
    model(x).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return model, x, grads


def _explosion_events(path, make_opt):
    """One monitored step; ``make_opt(model)`` gives one optimizer or a list of them (all step)."""
    model, x, _ = _linear_and_grads()
    opt = make_opt(model)
    with MonitorSession(StabilityMonitor(path, MonitorConfig(policy="observe")), model, opt) as s:
        s.start_step(0)
        loss = model(x).square().mean()
        s.after_forward(loss)
        loss.backward()
        if s.after_backward():
            for one in opt if isinstance(opt, list) else [opt]:
                one.step()
        s.end_step()
    return [e for e in read_trace(path).events if e["kind"] == "gradient_explosion"]


def test_an_sgd_update_larger_than_the_weights_is_caught_at_step_0(tmp_path):
    model, _, (gw, gb) = _linear_and_grads()
    weight = math.sqrt(sum(float(p.detach().square().sum()) for p in model.parameters()))
    lr_w, lr_b = 50.0, 5.0
    expected = math.sqrt((lr_w * float(gw.norm())) ** 2 + (lr_b * float(gb.norm())) ** 2) / weight
    assert expected > 1
    groups = lambda m: torch.optim.SGD([{"params": [m.weight], "lr": lr_w}, {"params": [m.bias], "lr": lr_b}])  # noqa: E731
    (event,) = _explosion_events(tmp_path / "sgd", groups)
    assert event["severity"] == "error" and event["step"] == 0 and event["data"]["rules"] == ["update"]
    assert event["data"]["update_ratio"] == pytest.approx(expected, rel=1e-5)
    assert f"the SGD update lr*g would change the parameters by {expected:.3g}x their own norm" in event["message"]
    assert event["message"].endswith("the optimizer applies it (on_explosion='observe'; 'skip' keeps the parameters)")
    assert _explosion_events(tmp_path / "adam", lambda m: torch.optim.Adam(m.parameters(), lr=50.0)) == []
    assert _explosion_events(tmp_path / "small", lambda m: torch.optim.SGD(m.parameters(), lr=1e-3)) == []


def test_update_origin_words_and_data():
    next_one = UpdateOrigin("w", 4, 5, 2.0, 500.0, 8.0, 2.0)
    assert next_one.message() == ("parameters of w grew from 2 to 500 at the update of step 4, gradient norm 8 = 4x "
                                  "its first value")
    assert "between steps 4 and 6" in UpdateOrigin("w", 4, 6, 2.0, 500.0, None, None).message()
    assert UpdateOrigin("w", 1, 2, 2.0, 500.0, 8.0, 2.0).message().endswith("= 4x its first value")
    assert UpdateOrigin("w", 0, 1, 2.0, 500.0, 8.0, 2.0).message().endswith("gradient norm 8")
    assert next_one.data() == {"module": "w", "update_step": 4, "before": 2.0, "after": 500.0, "grad_norm": 8.0,
                               "first_grad_norm": 2.0, "origin": next_one.message()}


def test_spike_message_names_at_most_four_sites():
    spike = Spike(3, Jump("total", 10.0, 1.0), 10.0, (), tuple(Jump(f"s{k}", 10.0 - k, 1.0) for k in range(5)))
    assert spike.message().count("linalg site ") == 4 and "s4" not in spike.message()
