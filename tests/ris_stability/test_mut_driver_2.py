"""The step driver seen from outside, second part: what a catastrophic finite gradient does to a watched loop
(stop at that step, or, under observe, the locator armed so that the crash it causes is found where it is
born), the locator aimed at the next steps (``risdiag locate``'s re-run), and the names a loop with callbacks
of its own gives its model and loss. Only public front doors (watch, Watcher, LoopCallbacks)."""

from __future__ import annotations

import math
import types
from pathlib import Path

import torch
from torch import nn

import ris_stability
from ris_stability import Watcher
from ris_stability.attach.callbacks import LoopCallbacks
from ris_stability.attach.finish import finish_run
from ris_stability.records import read_trace
from ris_stability.records.capsule import Capsule
from tests.ris_stability.test_mut_driver import through_backward


def _quartic(tmp_path: Path, **settings):
    """SGD at lr 3e-3 on a quartic loss far from its target: the gradient is catastrophic from step 0
    (the update would move the parameters 9.65x their norm) and the loss overflows in pow at step 3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=3e-3)
    x = torch.randn(32, 8)
    done = []
    with ris_stability.watch(model, opt, out=tmp_path / "run", report=False, **settings) as w:
        for step in range(6):
            loss = (model(x) - 10.0).pow(4).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done.append(step)
    return w, done


def test_an_explosion_under_stop_ends_the_block_at_that_step(tmp_path: Path) -> None:
    w, done = _quartic(tmp_path, on_explosion="stop")
    assert w.status == "stopped" and done == [] and w.skipped_steps == [0] and w.nonfinite_steps == []
    assert [r for r in read_trace(tmp_path / "run").steps.index] == [0]


def test_under_observe_the_steps_after_an_explosion_run_under_the_locator(tmp_path: Path) -> None:
    """The explosion at step 0 arms the locator for steps 1-3: the overflow it causes at step 3 is found in
    that step's own forward (not one step later, as after a plain non-finite step), named after the explosion."""
    w, done = _quartic(tmp_path)
    assert done == list(range(6)) and w.nonfinite_steps == [3, 4, 5]
    ((step, finding),) = w.findings
    assert step == 3 and finding.phase == "forward" and finding.op.startswith("aten.pow")
    event = next(e for e in read_trace(tmp_path / "run").events if e["kind"] == "finding")
    assert event["step"] == 3 and event["message"].startswith("finding (step 3, after a gradient explosion)")
    assert f": phase forward, {finding.op} at {finding.location}: {finding.cause}" in event["message"]
    assert "at the update of step 2" in event["message"]


class _LogOf(nn.Module):
    """log|x w|: a zero input row makes the loss -inf in the forward (aten.log)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.lin(x).abs()).mean()


def _aimed(tmp_path: Path, name: str, bad_from: int, attempts: int | None) -> list[int]:
    torch.manual_seed(0)
    model = _LogOf()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    with ris_stability.watch(model, opt, out=tmp_path / name, report=False) as w:
        if attempts is not None:  # aimed before the first step, as `risdiag locate`'s re-run aims at its bad step
            w.driver.arm_locator() if attempts == 1 else w.driver.arm_locator(attempts)
        for step in range(5):
            x = torch.randn(4, 3, generator=g)
            if step >= bad_from:
                x[1] = 0.0
            loss = model(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all(f.op.startswith("aten.log") and f.module == "model" for _, f in w.findings)
    for (step, f), event in zip(w.findings, [e for e in read_trace(tmp_path / name).events if e["kind"] == "finding"]):
        assert event["step"] == step and f"{f.node or f.op} in model at {f.location}: {f.cause}" in event["message"]
        if attempts is None:  # found after the fault: the message names the first bad step
            assert event["message"].startswith(f"finding (step {step}, first non-finite step {bad_from}): phase ")
    return [s for s, _ in w.findings]


def test_the_locator_aimed_at_the_next_step_finds_its_fault_there(tmp_path: Path) -> None:
    assert _aimed(tmp_path, "plain", bad_from=0, attempts=None) == [1]  # found one step after the fault
    assert _aimed(tmp_path, "aimed", bad_from=0, attempts=1) == [0]  # aimed: found in the faulty step itself
    # one attempt by default: a clean step 0 uses it, the fault of step 1 is found at step 2 as without aim
    assert _aimed(tmp_path, "spent", bad_from=1, attempts=1) == [2]
    assert _aimed(tmp_path, "two", bad_from=1, attempts=2) == [1]


class _Ctx(types.SimpleNamespace):
    def request_skip(self, reason):
        self.skip_requested = reason

    def request_stop(self, reason):
        pass


class _Eig(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return torch.linalg.eigh(h.T @ h + torch.eye(3))[0]


class _EigLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.ones(()))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(torch.outer(y[:2], y[:2]) * self.t + torch.eye(2))[0].sum()


def _callback_run(tmp_path: Path, name: str, with_loss: bool):
    """Steps 10-12 of a loop with callbacks of its own: its own learning rate (0.02, the optimizer's is 0.01),
    signal dimension and loss term; it skips step 11 itself ("my gate"); step 12's loss is NaN."""
    torch.manual_seed(0)
    model, loss_fn = _Eig(), (_EigLoss() if with_loss else None)
    params = [*model.parameters(), *(loss_fn.parameters() if loss_fn is not None else [])]
    opt = torch.optim.SGD(params, lr=0.01)
    w = Watcher(tmp_path / name, hooks=False, locate=False).start()
    cbs = LoopCallbacks(w.driver)
    assert cbs.error is None
    cbs.on_train_start(types.SimpleNamespace(model=model, optimizer=opt, loss_fn=loss_fn, scaler=None))
    losses = []
    for step in (10, 11, 12):
        x = torch.full((4, 3), float(step))
        ctx = _Ctx(step=step, batch={"x": x}, lr=0.02, signal_dims=1, skip_requested="", skipped=False,
                   skip_reason="")
        cbs.on_step_start(ctx)
        out = model(x)
        loss = (loss_fn(out) if loss_fn is not None else out.sum()) * (math.nan if step == 12 else 1.0)
        ctx.loss, ctx.terms = loss, {"main": loss}
        through_backward(cbs, ctx, opt, loss)
        own = step == 11
        if not ctx.skip_requested and not own:
            opt.step()
        ctx.skipped, ctx.skip_reason = (True, "my gate") if own else (bool(ctx.skip_requested), ctx.skip_requested)
        cbs.on_step_end(ctx)
        losses.append(float(loss.detach()))
    error = RuntimeError("the loop's own")
    cbs.on_exception(ctx, error)
    assert cbs.error is error
    finish_run(w, report=False)
    return read_trace(tmp_path / name), losses


def test_a_loop_with_callbacks_records_its_own_steps_rates_losses_and_skips(tmp_path: Path) -> None:
    trace, losses = _callback_run(tmp_path, "alone", with_loss=False)
    steps = trace.steps
    assert list(steps.index) == [10, 11, 12] and steps["lr"].tolist() == [0.02] * 3
    assert steps["loss"].tolist()[:2] == losses[:2] and math.isnan(steps.loc[12, "loss"])
    assert steps["loss/main"].tolist()[:2] == losses[:2]
    assert steps["mat/model:linalg.eigh/gap_split"].notna().all()  # the loop's signal dimension is used
    assert steps.loc[10, "update_ratio/lin"] > 0  # the update of an applied step is measured
    assert trace.skipped_steps == [11, 12] and trace.nonfinite_steps == [12]
    reasons = {e["step"]: e["data"]["reason"] for e in trace.events if e["kind"] == "step_skipped"}
    assert reasons == {11: "my gate", 12: "nonfinite"}
    bad = Capsule.load(next(p for p in trace.capsules if p.name == "step_000012.pt"))
    assert torch.equal(bad.batch["inputs"]["x"], torch.full((4, 3), 12.0))  # the loop's own batch


def test_a_loop_with_callbacks_names_its_model_and_its_loss_and_measures_the_model(tmp_path: Path) -> None:
    alone, _ = _callback_run(tmp_path, "alone", with_loss=False)
    assert alone.matrices == ["model:linalg.eigh"]
    both, _ = _callback_run(tmp_path, "both", with_loss=True)
    assert both.matrices == ["loss:linalg.eigh", "model:linalg.eigh"]
    assert both.grad_modules == ["lin"]  # the loop's model is what is measured, not a holder of model and loss
    assert "grad_group/0" in both.steps.columns  # the optimizer's parameter groups are read


def test_a_loop_that_left_its_bad_step_by_an_exception_decides_the_stop_itself(tmp_path: Path) -> None:
    """Under stop, a bad step the loop left without on_step_end (its own exception) is closed by the next
    on_step_start without raising into the loop: the stop was asked of the loop (request_stop)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = Watcher(tmp_path / "run", hooks=False, locate=False, on_nonfinite="stop").start()
    cbs = LoopCallbacks(w.driver)
    cbs.on_train_start(types.SimpleNamespace(model=model, optimizer=opt, loss_fn=None, scaler=None))
    stops = []
    for step in range(2):
        ctx = _Ctx(step=step, batch=None, lr=0.1, signal_dims=None, skip_requested="", skipped=False,
                   skip_reason="")
        ctx.request_stop = stops.append
        cbs.on_step_start(ctx)  # step 1: closes step 0, which never reached on_step_end
        ctx.loss, ctx.terms = model(torch.ones(2, 3)).sum() * math.nan, None
        cbs.on_after_forward(ctx)
        opt.zero_grad()
        ctx.loss.backward()
        ctx.grads_finite = None
        cbs.on_after_backward(ctx)
    assert len(stops) == 2 and w.nonfinite_steps == [0, 1]
    finish_run(w, report=False)
