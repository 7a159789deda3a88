"""The monitor on real training stacks: torch.compile, AMP (GradScaler, bf16), gradient accumulation,
several optimizers, liveness that tells None from non-finite, run metadata."""
import json
import math

import pytest
import torch
from torch import nn

from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.records import read_trace
from ris_stability.report.build import build_report


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.body(x))


def _events(run, kind=None):
    lines = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    return [e for e in lines if kind is None or e["kind"] == kind]


def _train(run, model, steps=20, nan_at=(), cfg=MonitorConfig(), call=None, scaler=None, autocast=None, lr=0.05):
    call = model if call is None else call
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    torch.manual_seed(1)
    with MonitorSession(StabilityMonitor(run, cfg), call, opt, scaler=scaler) as s:
        for step in range(steps):
            x = torch.randn(16, 4)
            if step in nan_at:
                x[0, 0] = math.nan
            s.start_step(step, x)
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = call(x).float().pow(2).mean()
            s.after_forward(loss)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if s.after_backward():
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
            opt.zero_grad(set_to_none=True)
            s.end_step()
    return read_trace(run)


# --- torch.compile ------------------------------------------------------------------------------------
def _check_compiled_run(run, trace):
    assert trace.summary["status"] == "nonfinite" and trace.nonfinite_steps == [7] and trace.skipped_steps == [7]
    compiled = _events(run, "compiled_model")
    assert len(compiled) == 1 and "not observed inside compiled regions" in compiled[0]["message"]
    assert any("compiled regions" in x for x in trace.summary["limitations"])
    # names are the user's, not the wrapper's
    assert "grad/head" in trace.steps.columns and not any("_orig_mod" in c for c in trace.steps.columns)
    assert len(trace.steps) == 20


@pytest.mark.parametrize("spelling", ["torch.compile(model)", "model.compile()"])
def test_compiled_model_trains_with_monitor(tmp_path, spelling):
    """Dynamo tracing (the part that crashed on the monitor's module hooks) with the light eager backend."""
    torch.manual_seed(0)
    model = TinyMLP()
    if spelling == "model.compile()":
        model.compile(backend="eager")
        call = model
    else:
        call = torch.compile(model, backend="eager")
    _check_compiled_run(tmp_path, _train(tmp_path, model, nan_at=(7,), call=call))
    if spelling == "torch.compile(model)":  # the report states the limitation too
        report = build_report(tmp_path).read_text()
        assert report.count("not observed inside compiled regions") >= 1


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["torch.compile(model)", "model.compile()"])
def test_compiled_model_inductor(tmp_path, spelling):
    torch.manual_seed(0)
    model = TinyMLP()
    if spelling == "model.compile()":
        model.compile()
        call = model
    else:
        call = torch.compile(model)
    _check_compiled_run(tmp_path, _train(tmp_path, model, nan_at=(7,), call=call))


# --- AMP ----------------------------------------------------------------------------------------------
def test_fp16_scaler_overflows_are_routine(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # overflows fp16 until it has backed off
    trace = _train(tmp_path, model, steps=30, scaler=scaler, autocast=torch.float16)
    overflow = [e["step"] for e in _events(tmp_path, "amp_overflow")]
    assert overflow and overflow == list(range(len(overflow)))  # the first steps, until the scale fits
    assert trace.summary["status"] == "clean" and trace.nonfinite_steps == [] and trace.capsules == []
    assert trace.summary["amp_overflow_steps"] == overflow
    assert all(e["data"]["scale"] > 1 for e in _events(tmp_path, "amp_overflow"))
    assert not _events(tmp_path, "nonfinite_grad") and not _events(tmp_path, "amp_scale_collapse")
    assert "amp_scale" in trace.steps.columns and trace.steps["amp_scale"].iloc[-1] < 2.0 ** 60


class SqrtAtZero(nn.Module):
    """A real fault under AMP: sqrt backward at 0 makes the gradient NaN at every scale."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(x) + torch.sqrt(self.lin.weight.sum() - self.lin.weight.sum())


def test_collapsing_scale_is_an_incident(tmp_path):
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    trace = _train(tmp_path, SqrtAtZero(), steps=12, scaler=scaler, autocast=torch.float16,
                   cfg=MonitorConfig(amp_collapse_steps=3))
    collapse = _events(tmp_path, "amp_scale_collapse")
    assert len(collapse) == 1 and collapse[0]["severity"] == "error" and "collapsed" in collapse[0]["message"]
    assert collapse[0]["data"]["scale"] < 1
    assert trace.summary["status"] == "nonfinite" and len(trace.capsules) == 1


def test_bf16_autocast_is_observed(tmp_path):
    torch.manual_seed(0)
    trace = _train(tmp_path, TinyMLP(), steps=5, autocast=torch.bfloat16)
    assert trace.summary["status"] == "clean" and trace.steps["grad/_total"].notna().all()
    assert not _events(tmp_path, "amp_overflow")


# --- accumulation and several optimizers ---------------------------------------------------------------
def test_accumulation_grad_norms_equal_hand_computation(tmp_path):
    torch.manual_seed(0)
    model, micro = TinyMLP(), 4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [[torch.randn(8, 4) for _ in range(micro)] for _ in range(3)]
    expected = []
    with MonitorSession(StabilityMonitor(tmp_path), model, opt) as s:
        for step, batches in enumerate(data):
            # hand computation on the same parameters: the gradient of the summed micro-batch losses
            params = list(model.parameters())
            grads = [torch.zeros_like(p) for p in params]
            for x in batches:
                for g, gi in zip(grads, torch.autograd.grad(model(x).pow(2).mean() / micro, params)):
                    g += gi
            expected.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
            s.start_step(step, batches)
            for x in batches:
                loss = model(x).pow(2).mean() / micro
                s.after_forward(loss)
                loss.backward()
            if s.after_backward():
                opt.step()
            opt.zero_grad(set_to_none=True)
            s.end_step()
    trace = read_trace(tmp_path)
    assert trace.steps["grad/_total"].tolist() == pytest.approx(expected, rel=1e-6)
    assert trace.steps["micro_batches"].tolist() == [micro] * 3


def test_two_optimizers_and_a_skip(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    opts = [torch.optim.SGD(model.body.parameters(), lr=0.1), torch.optim.Adam(model.head.parameters(), lr=0.01)]
    cfg = MonitorConfig(update_every=1)
    with MonitorSession(StabilityMonitor(tmp_path, cfg), model, opts) as s:
        for step in range(4):
            x = torch.randn(8, 4)
            if step == 2:
                x[0, 0] = math.nan
            s.start_step(step, x)
            loss = model(x).pow(2).mean()
            s.after_forward(loss)
            loss.backward()
            if s.after_backward():
                for opt in opts:
                    opt.step()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            s.end_step()
    trace = read_trace(tmp_path)
    assert trace.skipped_steps == [2] and len(trace.capsules) == 1
    for col in ("grad_group/0.0", "grad_group/1.0", "update_ratio_group/0.0", "update_ratio_group/1.0"):
        assert col in trace.steps.columns
    assert math.isnan(trace.steps.loc[2, "update_ratio_group/0.0"])  # skipped: no update measured
    assert trace.steps.loc[3, "update_ratio_group/1.0"] > 0


# --- liveness ---------------------------------------------------------------------------------------
class Liveness(nn.Module):
    """``broken`` gets a NaN gradient on the steps where the batch says so; ``unused`` never gets one."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.broken = nn.Parameter(torch.ones(1))
        self.unused = nn.Parameter(torch.ones(1))

    def forward(self, x, poison):
        scale = torch.sqrt(self.broken - 1.0) if poison else self.broken * 0.0
        return self.lin(x).pow(2).mean() + scale


def test_none_and_nonfinite_gradients_are_told_apart(tmp_path):
    torch.manual_seed(0)
    model = Liveness()
    opt = torch.optim.SGD(model.lin.parameters(), lr=0.01)
    cfg = MonitorConfig(dead_after=3)
    with MonitorSession(StabilityMonitor(tmp_path, cfg), model, opt) as s:
        for step in range(8):
            poison = step % 2 == 0  # broken's only non-zero gradients are NaN, on skipped steps
            s.start_step(step)
            loss = model(torch.randn(8, 4), poison)
            s.after_forward(loss, terms={"zero": loss * 0.0, "poisoned": loss})
            loss.backward()
            if s.after_backward():
                opt.step()
            model.zero_grad(set_to_none=True)
            s.end_step()
    dead = _events(tmp_path, "dead_parameter")
    none = [e for e in dead if e["data"]["gradient"] == "none"]
    zero = [e for e in dead if e["data"]["gradient"] == "zero"]
    assert none and none[0]["data"]["names"] == ["unused"] and "grad is None" in none[0]["message"]
    assert zero and zero[0]["data"]["names"] == ["broken"] and "exactly zero" in zero[0]["message"]
    bad = _events(tmp_path, "nonfinite_grad")
    assert len(bad) == 4 and all(e["data"]["nonfinite_parameters"] == ["broken"] for e in bad)
    assert "gradient non-finite" in bad[0]["message"]
    terms = _events(tmp_path, "dead_loss_term")
    assert [e["data"]["names"] for e in terms] == [["zero"]]  # the poisoned term's NaN steps do not count


def test_run_metadata(tmp_path):
    _train(tmp_path, TinyMLP(), steps=2)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["torch"] == str(torch.__version__) and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["command"] and "threads" in meta


# --- the monitor changes nothing ------------------------------------------------------------------------
class SpectralNormNet(nn.Module):
    """Uses an intercepted norm (spectral norm of a weight) and an eigh, under autocast."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        cov = (h.mT @ h).float() / h.shape[0] + torch.eye(4)
        return h.float().pow(2).mean() + torch.linalg.eigvalsh(cov).sum() * 1e-3 + \
            torch.linalg.matrix_norm(self.lin.weight, ord=2) * 1e-3


def _amp_accumulation(run_dir):
    torch.manual_seed(0)
    model = SpectralNormNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    data = [[torch.randn(8, 4) for _ in range(2)] for _ in range(4)]
    session = MonitorSession(StabilityMonitor(run_dir), model, opt, scaler=scaler) if run_dir else None
    if session:
        session.__enter__()
    for step, micro in enumerate(data):
        if session:
            session.start_step(step, micro)
        for x in micro:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(x) / len(micro)
            if session:
                session.after_forward(loss)
            scaler.scale(loss).backward()
        if session is None or session.after_backward():
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        if session:
            session.end_step()
    if session:
        session.__exit__(None, None, None)
    return model.state_dict(), scaler.get_scale()


def test_amp_accumulation_bit_identical_on_and_off(tmp_path):
    off, off_scale = _amp_accumulation(None)
    on, on_scale = _amp_accumulation(tmp_path)
    assert off_scale == on_scale and all(torch.equal(off[k], on[k]) for k in off)
    trace = read_trace(tmp_path)
    assert "mat/model:linalg.matrix_norm(ord=2)/gap_split" in trace.steps.columns


def test_loop_that_unscales_and_decides_itself(tmp_path):
    """A loop with a callback protocol of its own (ris_model's train_step order: unscale_, the loop's own
    grads_finite and "amp_overflow" skip reason), fed through LoopCallbacks."""
    from types import SimpleNamespace

    from ris_stability import Watcher
    from ris_stability.attach.callbacks import LoopCallbacks
    from ris_stability.attach.finish import finish_run
    torch.manual_seed(0)
    model = TinyMLP()
    w = Watcher(tmp_path, hooks=False).start()
    cbs = LoopCallbacks(w.driver)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    ctx = SimpleNamespace(model=model, optimizer=opt, loss_fn=None, scaler=scaler, step=0, lr=0.05, batch=None,
                          signal_dims=None, terms={}, loss=None, grads_finite=None, skip_requested="",
                          stop_requested="", skipped=False, skip_reason="")
    ctx.request_skip = lambda reason: setattr(ctx, "skip_requested", reason)
    ctx.request_stop = lambda reason: setattr(ctx, "stop_requested", reason)
    cbs.on_train_start(ctx)
    norms = []
    for step in range(12):
        ctx.step, ctx.grads_finite, ctx.skip_requested = step, None, ""
        cbs.on_step_start(ctx)
        with torch.autocast("cpu", dtype=torch.float16):
            ctx.loss = model(torch.randn(16, 4)).float().pow(2).mean()
        cbs.on_after_forward(ctx)
        scaler.scale(ctx.loss).backward()
        scaler.unscale_(opt)
        grads = [p.grad for p in model.parameters()]
        ctx.grads_finite = all(bool(g.isfinite().all()) for g in grads)
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
        cbs.on_after_backward(ctx)
        cbs.on_before_optimizer_step(ctx)
        scaler.step(opt)
        scaler.update()
        ctx.skipped, ctx.skip_reason = not ctx.grads_finite, "" if ctx.grads_finite else "amp_overflow"
        cbs.on_step_end(ctx)
        opt.zero_grad(set_to_none=True)
    cbs.on_train_end(ctx)
    finish_run(w, report=False)
    trace = read_trace(tmp_path)
    overflow = trace.summary["amp_overflow_steps"]
    assert overflow and trace.summary["status"] == "clean" and not trace.capsules
    fine = [s for s in range(12) if s not in overflow]
    assert trace.steps.loc[fine, "grad/_total"].tolist() == pytest.approx([norms[s] for s in fine], rel=1e-6)
