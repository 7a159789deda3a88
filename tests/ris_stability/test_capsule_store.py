"""Capsules that load and fit: numpy values stored as plain numbers and tensors (older capsules holding them
still load), a per-run budget (count and bytes; the first and the most recent kept, the rest counted as
dropped) and unchanged model / optimizer state stored once, by digest."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ris_stability import watch
from ris_stability.records.capsule import CAPSULE_FORMAT, CAPSULE_VERSION, Capsule, capture_rng, state_digest, storable
from ris_stability.records.capsule_store import CapsuleStore
from ris_stability.records import read_trace


def capsule(step: int, model_state: dict, lr=np.float64(0.5)) -> Capsule:
    return Capsule(step=step, batch={"x": torch.ones(2)}, model_state=model_state,
                   optimizer_state={"state": {}, "param_groups": [{"lr": lr, "momentum": np.float32(0.9),
                                                                   "betas": (np.float64(0.9), 0.99)}]},
                   rng=capture_rng(), meta={"loss": float("nan"), "table": np.arange(3)},
                   grads={"w": torch.full((3,), float("nan"))})


def test_numpy_values_become_numbers_and_tensors():
    out = storable({"lr": np.float64(0.25), "n": np.int64(3), "ok": np.bool_(True), "a": np.ones((2, 2)),
                    "nested": [(np.float32(1.5),)]})
    assert type(out["lr"]) is float and type(out["n"]) is int and type(out["ok"]) is bool
    assert isinstance(out["a"], torch.Tensor) and out["a"].dtype == torch.float64
    assert type(out["nested"][0][0]) is float


def test_capsule_with_numpy_scalars_loads_weights_only(tmp_path):
    path = capsule(0, {"w": torch.ones(3)}).save(tmp_path / "step_000000.pt")
    torch.load(path, weights_only=True)  # nothing a weights_only load refuses
    cap = Capsule.load(path)
    assert type(cap.optimizer_state["param_groups"][0]["lr"]) is float
    assert cap.grads["w"].isnan().all()  # never sanitised


def test_older_capsule_holding_numpy_still_loads(tmp_path):
    blob = {"format": CAPSULE_FORMAT, "version": CAPSULE_VERSION, "step": 2, "batch": {}, "model_state": {},
            "optimizer_state": {"param_groups": [{"lr": np.float64(0.1)}]}, "rng": capture_rng(),
            "config_text": "", "reason": "", "meta": {"lr": np.float64(0.1)}, "grads": None}
    torch.save(blob, tmp_path / "old.pt")  # as written before values were converted
    with pytest.raises(Exception):
        torch.load(tmp_path / "old.pt", weights_only=True)
    cap = Capsule.load(tmp_path / "old.pt")
    assert cap.optimizer_state["param_groups"][0]["lr"] == 0.1 and type(cap.meta["lr"]) is float


def test_budget_keeps_first_and_latest_and_shares_unchanged_state(tmp_path):
    store = CapsuleStore(tmp_path, max_count=3)
    state = {"w": torch.arange(1000.0)}
    for step in range(6):
        store.write(capsule(step, state))  # the skip policy leaves the state unchanged
    assert [p.name for p in store.kept] == ["step_000000.pt", "step_000004.pt", "step_000005.pt"]
    assert store.dropped == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "capsules").glob("step_*.pt")) == [p.name for p in store.kept]
    shared = list((tmp_path / "capsules" / "state").glob("*.pt"))
    assert len(shared) == 2  # one model state, one optimizer state, for every capsule
    for p in store.kept:
        cap = Capsule.load(p)
        assert torch.equal(cap.model_state["w"], state["w"]) and cap.meta["params_digest"] == state_digest(state)


def test_byte_budget_and_state_files_leave_with_their_last_capsule(tmp_path):
    store = CapsuleStore(tmp_path, max_count=10, max_bytes=1)  # nothing fits: first and latest stay
    for step in range(4):
        store.write(capsule(step, {"w": torch.full((100,), float(step))}))  # a new state every step
    assert [p.name for p in store.kept] == ["step_000000.pt", "step_000003.pt"] and store.dropped == [1, 2]
    digests = {f"{state_digest({'w': torch.full((100,), float(s))})}.pt" for s in (0, 3)}
    names = {p.name for p in (tmp_path / "capsules" / "state").glob("*.pt")}
    assert digests <= names and len(names) == 3  # the two model states kept + the one optimizer state


def test_missing_shared_state_is_a_clear_error(tmp_path):
    store = CapsuleStore(tmp_path, max_count=2)
    path, _ = store.write(capsule(0, {"w": torch.ones(2)}))
    for f in (tmp_path / "capsules" / "state").glob("*.pt"):
        f.unlink()
    with pytest.raises(ValueError, match="copy the capsules/ folder whole"):
        Capsule.load(path)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, *, x):
        return torch.log(self.lin(x) - 1e3).sum()  # log of a negative number: NaN on every step


def test_a_run_that_fails_every_step_stays_within_its_budget(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: np.float64(0.9) ** e)
    with watch(model, opt, out=tmp_path / "run", report=False, max_capsules=3) as w:
        for _ in range(8):
            loss = model(x=torch.randn(4, 3))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    assert w.nonfinite_steps == list(range(8))
    t = read_trace(tmp_path / "run")
    assert [p.name for p in t.capsules] == ["step_000000.pt", "step_000006.pt", "step_000007.pt"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["capsules_dropped"] == 5
    assert [e["step"] for e in t.events if e["kind"] == "capsule_dropped"] == [1, 2, 3, 4, 5]
    caps = [Capsule.load(p) for p in t.capsules]
    # skip leaves the parameters unchanged: one model state for all; the schedule moves the lr: 3 optimizer states
    assert len({c.meta["params_digest"] for c in caps}) == 1
    assert len(list((tmp_path / "run" / "capsules" / "state").glob("*.pt"))) == 1 + 3
