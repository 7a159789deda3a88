"""The step driver seen from outside: which steps a watched loop records, skips and counts, the learning rate
each row holds, what a loop with callbacks of its own is asked to do, and the pieces the driver reads from a loop
it does not own. Only public front doors (watch, LoopCallbacks) and the loop_parts helpers: it survives a
rewrite of the driver's internals."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import ris_stability
from ris_stability.attach.callbacks import LoopCallbacks
from ris_stability.attach.loop_parts import _lr, batch_state, model_of, optimizer_params


def through_backward(cbs, ctx, opt, loss) -> None:
    """A loop with callbacks of its own, from its forward to just before its step: the calls the pipeline's
    train() makes."""
    cbs.on_after_forward(ctx)
    opt.zero_grad()
    loss.backward()
    ctx.grads_finite = None
    cbs.on_after_backward(ctx)
    cbs.on_before_optimizer_step(ctx)

def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def _loop(model, opt, steps: int, bad: set[int], lrs: dict[int, float] | None = None, gate: set[int] = frozenset()):
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        if lrs and step in lrs:
            opt.param_groups[0]["lr"] = lrs[step]
        x = torch.randn(4, 3, generator=g)
        loss = model(x).pow(2).mean()
        if step in bad:
            loss = loss * torch.tensor(math.nan)  # a NaN loss and NaN gradients
        opt.zero_grad()
        loss.backward()
        if step not in gate:  # the script's own gate: no optimizer step
            opt.step()
    opt.zero_grad()


def test_a_watched_loop_records_every_step_skips_the_bad_one_and_reads_the_lr(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ris_stability.watch(model, opt, out=tmp_path / "run", report=False) as w:
        _loop(model, opt, 6, bad={2}, lrs={4: 0.05})
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["skipped"] for r in rows] == [False, False, True, False, False, False]
    assert [r["lr"] for r in rows] == [0.1, 0.1, 0.1, 0.1, 0.05, 0.05]
    assert rows[2]["loss"] == "nan" and all(isinstance(r["loss"], float) for i, r in enumerate(rows) if i != 2)
    assert w.nonfinite_steps == [2] and w.skipped_steps == [2] and w.status == "nonfinite"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["steps"] == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_step_the_script_does_not_apply_is_recorded_as_skipped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ris_stability.watch(model, opt, out=tmp_path / "run", report=False) as w:
        _loop(model, opt, 4, bad=set(), gate={1})
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["skipped"] for r in rows] == [False, True, False, False]
    assert w.skipped_steps == [1] and w.nonfinite_steps == [] and w.status == "clean"


def test_the_stop_policy_ends_the_block_at_the_bad_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ris_stability.watch(model, opt, out=tmp_path / "run", report=False, on_nonfinite="stop") as w:
        _loop(model, opt, 8, bad={2, 3, 4, 5, 6, 7})
    assert w.status == "stopped" and w.nonfinite_steps[0] == 2
    assert max(r["step"] for r in _rows(tmp_path / "run")) < 7


class Ctx(types.SimpleNamespace):
    """A loop's step context with its own skip / stop requests."""

    def request_skip(self, reason):
        self.requests.append(("skip", reason))
        self.skip_requested = reason

    def request_stop(self, reason):
        self.requests.append(("stop", reason))


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_loop_callbacks_ask_the_loop_to_skip_or_stop_a_bad_step(tmp_path: Path, policy) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from ris_stability import Watcher
    from ris_stability.attach.finish import finish_run

    w = Watcher(tmp_path / "run", hooks=False, locate=False, on_nonfinite=policy).start()
    # the loop's own callbacks feed the driver (no global hooks), as the pipeline's train() does
    cbs = LoopCallbacks(w.driver, stop_errors=(KeyError,))
    cbs.on_train_start(types.SimpleNamespace(model=model, optimizer=opt, loss_fn=None, scaler=None))
    asked = []
    for step in range(3):
        ctx = Ctx(step=step, batch={"x": torch.ones(2, 3)}, lr=0.1, signal_dims=None, requests=[],
                  skip_requested="", skipped=False, skip_reason="")
        cbs.on_step_start(ctx)
        loss = model(ctx.batch["x"]).sum() * (torch.tensor(math.nan) if step == 1 else 1.0)
        ctx.loss, ctx.terms = loss, None
        through_backward(cbs, ctx, opt, loss)
        if not ctx.skip_requested:
            opt.step()
        ctx.skipped, ctx.skip_reason = bool(ctx.skip_requested), ctx.skip_requested
        cbs.on_step_end(ctx)
        asked.append([kind for kind, _ in ctx.requests])
    finish_run(w, report=False)
    assert asked[0] == [] and asked[2 if policy == "skip" else 0] == []
    assert "skip" in asked[1]
    assert ("stop" in asked[1]) == (policy == "stop")
    assert cbs.stopped(KeyError("x")) is True and cbs.stopped(ValueError("x")) is None and cbs.stopped(None) is None
    assert w.nonfinite_steps == [1]


def test_model_of_holds_every_root_and_loose_parameter_without_changing_them() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 1)
    loose = nn.Parameter(torch.ones(3))
    assert model_of({"model": a}, list(a.parameters())) is a
    both = model_of({"model": a, "loss": b}, list(a.parameters()))
    assert isinstance(both, nn.ModuleDict) and both["model"] is a and both["loss"] is b and "params" not in both
    extra = model_of({"model": a}, list(a.parameters()) + [loose])
    assert extra["model"] is a and list(extra["params"]) == [loose]
    opt = torch.optim.SGD([{"params": a.parameters()}, {"params": [loose], "lr": 0.5}], lr=0.1)
    assert optimizer_params(opt) == list(a.parameters()) + [loose]


def test_batch_state_and_learning_rate_readers() -> None:
    x = torch.ones(2)

    class Odd:
        def __repr__(self):
            return "<odd>"

    state = batch_state({"x": x, "pair": (x, 3), "cfg": {"k": None, "f": 0.5, "s": "t"}, "o": Odd()})
    inputs = state["inputs"]
    assert torch.equal(inputs["x"], x) and inputs["x"] is not x and not inputs["x"].requires_grad
    assert isinstance(inputs["pair"], list) and inputs["pair"][1] == 3
    assert inputs["cfg"] == {"k": None, "f": 0.5, "s": "t"} and inputs["o"] == "<odd>"
    assert batch_state(None) == {"inputs": {}}
    deep: dict = {}
    cur = deep
    for _ in range(10):
        cur["d"] = {}
        cur = cur["d"]
    assert isinstance(batch_state(deep)["inputs"]["d"]["d"]["d"]["d"]["d"]["d"]["d"], str)  # cut at depth 7
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.25)
    assert _lr(opt) == 0.25 and _lr([opt]) == 0.25
    assert math.isnan(_lr(None)) and math.isnan(_lr([]))
    opt.param_groups[0]["lr"] = torch.tensor(0.1)  # not a plain number
    assert math.isnan(_lr(opt))
