"""Differential fuzz (issue #30): Hypothesis writes small training programs over the linear-algebra ops the
toolkit observes (eig, eigh, eigvals(h), svd, svdvals, pinv, inv, solve, qr, cholesky, lstsq, det, slogdet,
matrix_norm; real or complex, batched or not, a random subset of each op's outputs used, views and in-place
ops on the results, a non-finite input at a random step), runs each plainly and under every front door
(``watch`` with the model named, the traced script's discovery hooks, MonitorSession) and asserts that no
toolkit error occurred (none raised, none recorded by the guard) and that the losses, the errors the program
met and the parameters are bit-identical to the plain run. The policy is ``observe`` so that a non-finite
step is stepped as in the plain run (skip changes results on purpose; test_watch covers it)."""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ris_stability
from ris_stability import MonitorSession, StabilityMonitor
from ris_stability.monitor.config import MonitorConfig
from ris_stability.records.capsule import clone_state

N = 4
STEPS = 3
TRIED = {"programs": 0}  # programs run to the end (each under every front door): printed by the slow run

# op -> (matrix it needs: "spd" | "square" | "tall", number of outputs)
OPS = {
    "eig": ("square", 2), "eigvals": ("square", 1), "eigh": ("spd", 2), "eigvalsh": ("spd", 1),
    "svd": ("square", 3), "svdvals": ("square", 1), "pinv": ("tall", 1), "inv": ("square", 1),
    "solve": ("square", 1), "qr": ("tall", 2), "cholesky": ("spd", 1), "lstsq": ("tall", 2),
    "det": ("square", 1), "slogdet": ("square", 2), "matrix_norm": ("square", 1),
}
POST = ("none", "view", "inplace", "slice-inplace")


@dataclass(frozen=True)
class Call:
    op: str
    complex: bool
    batched: bool
    used: tuple[bool, ...]  # which outputs reach the loss (at least one)
    post: str  # what the program does to the outputs before using them
    norm: str  # matrix_norm's ord


@dataclass(frozen=True)
class Program:
    calls: tuple[Call, ...]
    bad_step: int  # a NaN (or Inf) in the input at this step; -1: none
    bad_value: float


@st.composite
def calls(draw) -> Call:
    op = draw(st.sampled_from(sorted(OPS)))
    outputs = OPS[op][1]
    used = tuple(draw(st.lists(st.booleans(), min_size=outputs, max_size=outputs)))
    if not any(used):
        used = (True,) + used[1:]
    return Call(op, draw(st.booleans()), draw(st.booleans()), used, draw(st.sampled_from(POST)),
                draw(st.sampled_from(["fro", "nuc", "2"])))


# lstsq of a non-finite matrix is LAPACK undefined behaviour in torch itself (gelsy: "INTERNAL ASSERT FAILED ...
# Argument 4 has illegal value", then results that differ between two plain runs): not a program to compare.
programs = st.builds(Program, st.lists(calls(), min_size=1, max_size=3).map(tuple),
                     st.integers(-1, STEPS - 1), st.sampled_from([math.nan, math.inf])).filter(
    lambda p: p.bad_step < 0 or all(c.op != "lstsq" for c in p.calls))


def matrix(a: torch.Tensor, call: Call) -> torch.Tensor:
    shape = OPS[call.op][0]
    if call.complex:
        a = torch.complex(a, a.flip(-1) * 0.5)
    eye = torch.eye(N, dtype=a.dtype)
    if shape == "spd":
        return a @ a.transpose(-1, -2).conj() + eye
    if shape == "tall":
        return torch.cat([a, a[..., :1, :] * 0.5], dim=-2)
    return a + 2 * eye


def run_call(m: torch.Tensor, call: Call, rhs: torch.Tensor) -> list[torch.Tensor]:
    la = torch.linalg
    op = call.op
    if op == "solve":
        out = la.solve(m, rhs.to(m.dtype))
    elif op == "lstsq":
        res = la.lstsq(m, torch.cat([rhs, rhs[..., :1, :]], dim=-2).to(m.dtype))
        out = (res.solution, res.residuals)
    elif op == "matrix_norm":
        out = la.matrix_norm(m, ord=2 if call.norm == "2" else call.norm)
    else:
        out = getattr(la, op)(m)
    outs = list(out) if isinstance(out, tuple) else [out]
    return [o for o in outs if o.is_floating_point() or o.is_complex()]


def use(outs: list[torch.Tensor], call: Call) -> torch.Tensor:
    total = torch.zeros(())
    for used, o in zip(call.used, outs):
        if call.post == "view" and o.dim() >= 1:
            o = o.transpose(-1, -2) if o.dim() >= 2 else o[..., :1]
        elif call.post == "inplace" and o.requires_grad:
            o.mul_(1.5)  # may invalidate what backward saved: the plain run then raises the same error
        elif call.post == "slice-inplace" and o.dim() >= 1 and o.requires_grad:
            o[..., :1].mul_(0.5)
        if used and o.numel():
            total = total + o.abs().sum()  # |.|: invariant to the phases/signs of eigen/singular vectors
    return total


def build(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    lin = nn.Linear(N, N)
    return lin, torch.optim.SGD(lin.parameters(), lr=1e-3, momentum=0.9), torch.randn(2, N, N), torch.randn(N, 2)


def train(program: Program, lin, opt, x, rhs, session: MonitorSession | None = None):
    """The program's training loop; each step's outcome is its loss or the name of the error it met."""
    outcomes = []
    for step in range(STEPS):
        opt.zero_grad()
        xs = x.clone()
        if step == program.bad_step:
            xs[0, 1, 2] = program.bad_value
        try:
            if session is not None:
                session.start_step(step)
            a = lin(xs)
            loss = torch.zeros(())
            for call in program.calls:
                loss = loss + use(run_call(matrix(a if call.batched else a[0], call), call, rhs), call)
            if session is not None:
                session.after_forward(loss)
            loss.backward()
            if session is None or session.after_backward():
                opt.step()
            outcomes.append(loss.detach().clone())
        except (RuntimeError, ValueError) as err:  # what the ops themselves raise (singular, NaN input, ...)
            outcomes.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
        finally:
            if session is not None:
                session.end_step()
    return outcomes, clone_state(lin.state_dict())


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b) or (
            isinstance(b, torch.Tensor) and a.shape == b.shape and bool((a.isnan() == b.isnan()).all())
            and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))  # NaN == NaN here: bitwise same run
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def toolkit_errors(run_dir: Path) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    return [e["data"] for e in events if e["kind"] == "instrument_error"]


def check(program: Program) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: a shared, loaded CPU makes intra-op threads cost 100x (same for both runs)
    try:
        _check(program)
    finally:
        torch.set_num_threads(threads)


def _check(program: Program) -> None:
    plain = train(program, *build())
    folder = Path(tempfile.mkdtemp(prefix="risfuzz-"))
    try:
        for door in ("watch", "discovery", "session"):
            run_dir = folder / door
            lin, opt, x, rhs = build()
            if door == "session":
                cfg = MonitorConfig(policy="observe")
                with MonitorSession(StabilityMonitor(run_dir, cfg), lin, opt) as s:
                    got = train(program, lin, opt, x, rhs, session=s)
            else:
                named = (lin, opt) if door == "watch" else (None, None)
                with ris_stability.watch(*named, out=run_dir, report=False, on_nonfinite="observe"):
                    got = train(program, lin, opt, x, rhs)
            assert toolkit_errors(run_dir) == [], (door, program)
            assert same(got, plain), (door, program, got, plain)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    TRIED["programs"] += 1


FUZZ = settings(deadline=None, max_examples=25, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(programs)
def test_front_doors_change_nothing_and_never_fail(program):
    check(program)


@pytest.mark.slow
@settings(deadline=None, max_examples=300, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
def test_front_doors_change_nothing_and_never_fail_long(program):
    check(program)


@pytest.mark.slow
def test_report_programs_tried():
    """Run after the long fuzz (same module): how many programs it ran, for the closing note."""
    print(f"\ndifferential fuzz: {TRIED['programs']} programs run under watch, discovery and MonitorSession")
