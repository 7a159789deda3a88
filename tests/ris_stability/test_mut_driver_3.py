"""The step driver seen from outside, third part: what a finding leaves in the trace and in finding.json, how
many located faults a run keeps, how many armed steps a fault buys under each policy, the gradients a skipped
step hands back to the script, a GradScaler told through a loop's callbacks, a rank that received another rank's
NaN, and the script-trace message of a script that never stepped its optimizer."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

import ris_stability
from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor, Watcher
from ris_stability.attach.callbacks import LoopCallbacks
from ris_stability.attach.driver import StepDriver
from ris_stability.attach.finish import finish_run
from ris_stability.attach.loop_parts import batch_state
from ris_stability.attach.script import trace_script
from ris_stability.monitor.context import LoopContext, NonFiniteError
from ris_stability.records import read_trace
from tests.ris_stability.test_mut_driver import through_backward
from tests.ris_stability.test_mut_driver_2 import _LogOf, _quartic


class _Live:
    """A live view that records what it is told (the terminal's view marks non-finite events)."""

    def __init__(self) -> None:
        self.updates: list[tuple[int, str | None, bool]] = []

    def update(self, step, row=None, event=None, nonfinite=False, **_):
        if event is not None:
            self.updates.append((step, event, nonfinite))


def _log_run(tmp_path: Path, bad: set[int], steps: int, live=None, **settings):
    """log|x w| under a Watcher: a zero input row at the steps in ``bad`` makes the loss -inf (aten.log)."""
    torch.manual_seed(0)
    model = _LogOf()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    done = []
    w = Watcher(tmp_path / "run", model, opt, live=live, **settings).start()
    try:
        for step in range(steps):
            x = torch.randn(4, 3, generator=g)
            if step in bad:
                x[1] = 0.0
            loss = model(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done.append(step)
    except NonFiniteError as exc:
        finish_run(w, exc, report=False)
    else:
        finish_run(w, report=False)
    return w, done, read_trace(tmp_path / "run")


def test_the_finding_event_and_file_say_where_when_and_from_what(tmp_path: Path) -> None:
    """A recurring fault from step 1: the locator armed for step 2 finds it; one finding is kept, however
    often the fault comes back (the default ``max_findings``)."""
    live = _Live()
    w, _, trace = _log_run(tmp_path, bad=set(range(1, 8)), steps=8, live=live)
    ((step, finding),) = w.findings
    assert step == 2 and finding.op.startswith("aten.log")
    (event,) = [e for e in trace.events if e["kind"] == "finding"]
    data = event["data"]
    assert event["severity"] == "error" and event["step"] == 2
    assert data["first_nonfinite_step"] == 1
    assert (2, event["message"], True) in live.updates  # the live view marks the finding non-finite
    assert data["source"] == "in-process locator" and "update_origin" not in data
    assert data["finding"]["op"] == finding.op and data["finding"]["location"] == finding.location
    stored = json.loads((tmp_path / "run" / "finding.json").read_text())
    assert stored["step"] == 2 and stored["first_nonfinite_step"] == 1 and stored["op"] == finding.op
    assert stored["source"] == "in-process locator (armed step of the traced script)"
    assert "update_origin" not in stored


def test_a_finding_after_an_explosion_names_the_update_that_caused_it(tmp_path: Path) -> None:
    w, _ = _quartic(tmp_path)
    (event,) = [e for e in read_trace(tmp_path / "run").events if e["kind"] == "finding"]
    origin = event["data"]["update_origin"]
    assert origin.startswith("parameters of ") and "at the update of step 2" in origin
    assert event["message"].endswith("; " + origin)  # the note, without its separator
    assert event["data"]["first_nonfinite_step"] is None
    (first,) = [e for e in read_trace(tmp_path / "run").events if e["kind"] == "explosion_origin"]
    assert first["message"] == "step 3 went non-finite after an explosion: " + origin  # the finding's step
    assert first["data"]["failed_step"] == 3
    assert json.loads((tmp_path / "run" / "finding.json").read_text())["update_origin"] == origin


def test_a_fault_that_skips_a_step_is_still_found_in_one_of_the_three_armed_steps(tmp_path: Path) -> None:
    """Bad at 1 and 3, clean at 2: the first armed step (2) finds nothing, the second (3) finds it."""
    w, done, _ = _log_run(tmp_path, bad={1, 3}, steps=6)
    assert done == list(range(6)) and w.nonfinite_steps == [1, 3]
    assert [s for s, _ in w.findings] == [3]


def test_under_stop_a_fault_buys_one_armed_step_then_the_block_ends(tmp_path: Path) -> None:
    """A one-off fault at step 2 under stop: step 3 runs under the locator (clean: nothing found), then the
    stop ends the block; no further steps run."""
    w, done, trace = _log_run(tmp_path, bad={2}, steps=8, on_nonfinite="stop")
    assert done == [0, 1, 2] and w.status == "stopped" and w.findings == []
    assert list(trace.steps.index) == [0, 1, 2, 3]


def test_a_skipped_step_hands_its_gradients_back_after_the_optimizer_step(tmp_path: Path) -> None:
    """The skip hides the gradients from the update only: after optimizer.step() the script's own logging
    reads the NaN gradients backward made."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with ris_stability.watch(model, opt, out=tmp_path / "run", report=False, locate=False) as w:
        for step in range(3):
            loss = model(torch.ones(2, 3)).sum() * (math.nan if step == 1 else 1.0)
            opt.zero_grad()
            loss.backward()
            before = model.weight.detach().clone()
            opt.step()
            seen.append((model.weight.grad, torch.equal(before, model.weight.detach())))
    assert w.skipped_steps == [1]
    grad, unchanged = seen[1]
    assert grad is not None and torch.isnan(grad).all() and unchanged
    assert seen[0][0] is not None and not seen[0][1]


class _Ctx(types.SimpleNamespace):
    def request_skip(self, reason):
        self.skip_requested = reason

    def request_stop(self, reason):
        pass


def test_a_grad_scaler_told_through_the_callbacks_makes_its_overflow_routine(tmp_path: Path) -> None:
    """A loop hands its GradScaler in its context: an overflow of the scaled gradients (finite loss) is the
    scaler's routine (recorded as amp_overflow; the scaler skips the step), not a non-finite step."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    w = Watcher(tmp_path / "run", hooks=False, locate=False).start()
    cbs = LoopCallbacks(w.driver)
    cbs.on_train_start(types.SimpleNamespace(model=model, optimizer=opt, loss_fn=None, scaler=scaler))
    for step in range(3):
        ctx = _Ctx(step=step, batch=None, lr=1e-3, signal_dims=None, skip_requested="", skipped=False,
                   skip_reason="")
        cbs.on_step_start(ctx)
        loss = model(torch.ones(2, 3)).sum() * (1e35 if step == 1 else 1.0)  # finite; x 65536 overflows
        ctx.loss, ctx.terms = loss, None
        cbs.on_after_forward(ctx)
        opt.zero_grad()
        scaler.scale(loss).backward()
        ctx.grads_finite = None
        cbs.on_after_backward(ctx)
        cbs.on_before_optimizer_step(ctx)
        scaler.step(opt)
        scaler.update()
        cbs.on_step_end(ctx)
    finish_run(w, report=False)
    trace = read_trace(tmp_path / "run")
    assert trace.nonfinite_steps == [] and trace.summary["status"] == "clean"
    assert [e["step"] for e in trace.events if e["kind"] == "amp_overflow"] == [1]


class _Monitor:
    """What the driver asks of a monitor when a rank's locator ran in a step whose NaN may have come from
    elsewhere (``origins``: the ranks the collective decision names; ``here``: this rank is one of them)."""

    def __init__(self, origins, here: bool = False, run_dir: Path | None = None):
        self.last_decision = None if origins is None else types.SimpleNamespace(origins=origins)
        self.events = []
        self.here, self.run_dir = here, run_dir

    def originates_fault(self) -> bool:
        return self.here

    def trace_back_note(self, step) -> str:
        return ""

    def event(self, kind, severity, message, **data):
        self.events.append((kind, severity, message, data))


@pytest.mark.parametrize("origins", [[1, 3], None])
def test_a_rank_that_received_the_nan_defers_to_the_originating_ranks(origins) -> None:
    mon = _Monitor(origins)
    driver = StepDriver(mon)  # type: ignore[arg-type]
    driver.ctx = LoopContext(model=nn.Linear(1, 1), step=7)
    driver._pending, driver._attempts_left = object(), 2
    driver._settle_finding()
    ((kind, severity, message, data),) = mon.events
    expected = origins if origins is not None else []
    assert (kind, severity) == ("finding_elsewhere", "info") and driver.findings == []
    assert message == ("step 7: the non-finite gradients reached this rank through the gradient all-reduce; "
                       f"the finding is in the shard of originating rank(s) {expected}")
    assert data == {"step": 7, "origin_ranks": expected}
    assert driver._attempts_left == 0  # no more armed steps on this rank


def test_a_rank_that_originated_the_nan_keeps_its_finding(tmp_path: Path) -> None:
    w, _, _ = _log_run(tmp_path, bad={1, 2}, steps=3)
    ((_, finding),) = w.findings
    mon = _Monitor([0], here=True, run_dir=tmp_path / "rank0")
    (tmp_path / "rank0").mkdir()
    driver = StepDriver(mon)  # type: ignore[arg-type]
    driver.ctx = LoopContext(model=nn.Linear(1, 1), step=4)
    driver._pending = finding
    driver._settle_finding()
    assert driver.findings == [(4, finding)]
    ((kind, _, message, data),) = mon.events
    assert kind == "finding" and data["finding"] == finding.to_dict() and message.startswith("finding (step 4, ")
    assert json.loads((tmp_path / "rank0" / "finding.json").read_text())["op"] == finding.op


def test_deep_inputs_are_cut_at_depth_seven_as_their_repr() -> None:
    deep: list = [1.5]
    for _ in range(9):
        deep = [deep]
    inputs = batch_state({"x": deep})["inputs"]["x"]
    cut = inputs
    for _ in range(6):
        assert isinstance(cut, list)
        cut = cut[0]
    assert cut == repr([[[[1.5]]]])  # cut at depth 7 (the dict is depth 0): the rest as text


@pytest.mark.parametrize("calls", [0, 2])
def test_a_traced_script_that_never_steps_says_how_many_backward_calls_it_saw(tmp_path: Path, calls) -> None:
    script = tmp_path / "nostep.py"
    script.write_text("import torch\n"
                      "w = torch.ones(2, requires_grad=True)\n"
                      f"for _ in range({calls}):\n"
                      "    (w * 2).sum().backward()\n")
    run = trace_script([str(script)], out=str(tmp_path / "run"))
    assert "never called optimizer.step()" in run.message
    assert (f"({calls} backward calls seen)" in run.message) == (calls > 0)
    assert ("(and never called backward)" in run.message) == (calls == 0)


def _session_loop(tmp_path: Path, model: nn.Module, optimizer, steps: int, update) -> tuple[MonitorSession, list]:
    """A hand-written loop under MonitorSession: a zero input row from step 2 on (log of 0 in the model);
    ``update()`` applies a step the session allows. Returns the session and, per step, (allowed, a dispatch
    mode still installed after the step's end)."""
    seen = []
    with MonitorSession(StabilityMonitor(tmp_path / "run", MonitorConfig(on_explosion="stop")), model,
                        optimizer) as s:
        for step in range(steps):
            s.start_step(step)
            x = torch.ones(4, 3)
            if step >= 2:
                x[1] = 0.0
            loss = model(x)
            s.after_forward(loss)
            model.zero_grad()
            loss.backward()
            ok = s.after_backward()
            if ok:
                update()
            s.end_step()
            seen.append((ok, _get_current_dispatch_mode() is not None))
    return s, seen


def test_a_hand_written_loop_gets_its_finding_and_the_locator_leaves_after_its_step(tmp_path: Path) -> None:
    """MonitorSession: a fault from step 2 on (log of 0) is located in the armed step 3, once however often
    it recurs, and no dispatch mode of the locator outlives the armed step."""
    torch.manual_seed(0)
    model = _LogOf()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    s, seen = _session_loop(tmp_path, model, opt, 8, opt.step)
    assert s.monitor.nonfinite_steps == list(range(2, 8))
    assert [(st, f.op.split(".")[0] + "." + f.op.split(".")[1], f.phase) for st, f in s.driver.findings] == [
        (3, "aten.log", "forward")]
    (event,) = [e for e in read_trace(tmp_path / "run").events if e["kind"] == "finding"]
    assert event["step"] == 3 and event["data"]["first_nonfinite_step"] == 2
    assert not any(mode for _, mode in seen)


class _TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.b(self.a(x) * 0.0 + x).abs()).mean()


@pytest.mark.parametrize("optimizers", ["two", "none"])
def test_a_hand_written_loop_with_several_optimizers_or_none_is_checked_and_located(tmp_path: Path,
                                                                                     optimizers) -> None:
    """MonitorSession with a list of optimizers (one per part), or none (a hand-written update): the bad step
    is refused (after_backward False), the update is the loop's own, and the fault is located."""
    torch.manual_seed(0)
    model = _TwoPart()
    opts = [torch.optim.SGD(model.a.parameters(), lr=1e-3), torch.optim.SGD(model.b.parameters(), lr=1e-3)]

    def update() -> None:
        if optimizers == "two":
            for opt in opts:
                opt.step()
            return
        with torch.no_grad():
            for p in model.parameters():
                p -= 1e-3 * p.grad

    s, seen = _session_loop(tmp_path, model, opts if optimizers == "two" else None, 5, update)
    assert [ok for ok, _ in seen] == [True, True, False, False, False] and s.monitor.nonfinite_steps == [2, 3, 4]
    assert [(st, f.op.startswith("aten.log")) for st, f in s.driver.findings] == [(3, True)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
