"""StabilityMonitor on a toy loop (no ris_model): bit-identity, non-finite handling, capsules, trace rows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ris_stability.records.capsule import Capsule
from ris_stability import MonitorConfig, MonitorSession, StabilityMonitor
from ris_stability.records import read_trace

N, R = 24, 3


class Factor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2 * N * R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.lin(x).reshape(-1, N, R, 2)
        return torch.complex(f[..., 0], f[..., 1])


class Toy(nn.Module):
    """Low-rank covariance from a factor, optional diagonal loading, projector loss via eigenvectors.
    Loaded, its null space is an exact tie by construction, so torch's eigh backward is 0/0."""

    def __init__(self, loading: float) -> None:
        super().__init__()
        self.factor = Factor()
        self.loading = loading

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor(x)
        if self.loading:
            # Rows beyond R exactly zero: c is block-diagonal and its loaded null block is exactly
            # loading / N * I, so the N - R tied eigenvalues are bit-equal on any BLAS/LAPACK.
            f = f * (torch.arange(N) < R)[:, None]
        c = f @ f.mH
        c = c / torch.diagonal(c, dim1=-2, dim2=-1).real.sum(-1)[..., None, None]
        c = (1 - self.loading) * c + self.loading / N * torch.eye(N, dtype=c.dtype)
        _, v = torch.linalg.eigh(c)
        top = v[..., -R:]
        return (top @ top.mH).real.diagonal(dim1=-2, dim2=-1).square().sum()


def run(loading: float, steps: int, monitor: StabilityMonitor | None, seed: int = 0):
    torch.manual_seed(seed)
    model = Toy(loading)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(6, 4)
    losses, grads = [], []
    session = MonitorSession(monitor, model, opt) if monitor else None
    if session:
        session.__enter__()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        if session:
            session.start_step(step, batch={"x": x}, lr=1e-2)
        loss = model(x)
        if session:
            session.after_forward(loss, {"proj": loss})
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        losses.append(loss.detach().clone())
        ok = session.after_backward() if session else all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        if ok:
            opt.step()
        if session:
            session.end_step()
    if session:
        session.__exit__(None, None, None)
    return losses, grads, model


def test_monitor_is_bit_identical_on_and_off(tmp_path):
    off_l, off_g, off_m = run(0.0, 4, None)
    on_l, on_g, on_m = run(0.0, 4, StabilityMonitor(tmp_path / "run"))
    assert all(torch.equal(a, b) for a, b in zip(off_l, on_l))
    assert all(torch.equal(a, b) for ga, gb in zip(off_g, on_g) for a, b in zip(ga, gb))
    assert all(torch.equal(a, b) for a, b in zip(off_m.state_dict().values(), on_m.state_dict().values()))


def test_nonfinite_step_is_skipped_captured_and_named(tmp_path):
    mon = StabilityMonitor(tmp_path / "run", MonitorConfig(max_capsules=2), replayer="x:y")
    losses, grads, _ = run(0.3, 3, mon)
    assert not all(bool(torch.isfinite(g).all()) for g in grads[0]), "the loaded toy must produce a NaN gradient"
    trace = read_trace(tmp_path / "run")
    assert trace.nonfinite_steps == [0, 1, 2]
    bad = [e for e in trace.events if e["kind"] == "nonfinite_grad"]
    assert bad and bad[0]["data"]["matrix"] == "model:linalg.eigh"
    assert bad[0]["data"]["module"] == "model" and bad[0]["data"]["vec_grad"] is True
    assert bad[0]["data"]["max_cluster"] == N - R
    assert len(mon.capsules) == 2  # max_capsules respected
    cap = Capsule.load(mon.capsules[0])
    assert cap.step == 0 and cap.meta["replayer"] == "x:y" and cap.meta["grads_finite"] is False
    assert cap.batch["batch"]["x"].shape == (6, 4)
    row = trace.steps.loc[0]
    assert row["mat/model:linalg.eigh/max_cluster"] == N - R
    assert row["mat/model:linalg.eigh/min_gap"] == 0.0
    assert bool(row["skipped"]) and bool(row["nonfinite"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["nonfinite_steps"] == [0, 1, 2]


def test_capsule_holds_pre_step_state(tmp_path):
    mon = StabilityMonitor(tmp_path / "run")
    torch.manual_seed(0)
    model = Toy(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with MonitorSession(mon, model, opt) as s:
        s.start_step(0, batch={"x": torch.randn(6, 4)})
        loss = model(torch.randn(6, 4))
        s.after_forward(loss)
        loss.backward()
        assert s.after_backward() is False
        s.end_step()
    cap = Capsule.load(mon.capsules[0])
    assert all(torch.equal(cap.model_state[k], before[k]) for k in before)


def test_clean_run_has_no_events_of_failure(tmp_path):
    mon = StabilityMonitor(tmp_path / "run", MonitorConfig(every=2))
    run(0.0, 4, mon)
    trace = read_trace(tmp_path / "run")
    assert trace.nonfinite_steps == []
    assert list(trace.steps.index) == [0, 2]  # every=2
    assert not math.isnan(trace.steps.loc[0, "grad/_total"])
    assert not any(e["kind"].startswith("nonfinite") for e in trace.events)
    assert mon.capsules == []


def test_stop_policy_requests_stop(tmp_path):
    mon = StabilityMonitor(tmp_path / "run", MonitorConfig(policy="stop"))
    torch.manual_seed(0)
    model = Toy(0.3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with MonitorSession(mon, model, opt) as s:
        s.start_step(0)
        loss = model(torch.randn(6, 4))
        s.after_forward(loss)
        loss.backward()
        s.after_backward()
        s.end_step()
        assert s.stop_requested


@pytest.mark.parametrize("kwargs", [dict(every=0), dict(dead_after=0), dict(policy="ignore")], ids=str)
def test_bad_monitor_config(kwargs):
    with pytest.raises(ValueError, match="MonitorConfig"):
        MonitorConfig(**kwargs)


def test_update_ratios_are_sampled(tmp_path):
    run(0.0, 12, StabilityMonitor(tmp_path / "run", MonitorConfig(update_every=10)))
    steps = read_trace(tmp_path / "run").steps
    ratio = [c for c in steps.columns if c.startswith("update_ratio/")]
    assert ratio, "update ratios must be recorded on sampled steps"
    recorded = steps[ratio[0]].dropna().index.tolist()
    assert recorded == [0, 10]
    assert (steps.loc[[0, 10], ratio[0]] > 0).all()
