"""Crash capsule format and the live dashboard's pure builders."""

from __future__ import annotations

import random

import pytest
import torch
from rich.console import Console

from ris_stability.records.capsule import CAPSULE_VERSION, Capsule, CapsuleError, capture_rng, clone_state, restore_rng
from ris_stability.cli.live import DashboardState, LiveView, build_dashboard, plain_line, worst_matrices


def _capsule(step: int = 3) -> Capsule:
    return Capsule(step=step, batch={"x": torch.arange(4.0)}, model_state={"w": torch.ones(2, 2)},
                   optimizer_state={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, rng=capture_rng(),
                   config_text='name = "t"\n', reason="non-finite gradient", meta={"loss": float("nan")})


def test_capsule_round_trip(tmp_path):
    path = _capsule().save(tmp_path / "c" / "step_000003.pt")
    cap = Capsule.load(path)
    assert cap.step == 3 and torch.equal(cap.batch["x"], torch.arange(4.0))
    assert torch.equal(cap.model_state["w"], torch.ones(2, 2)) and cap.config_text == 'name = "t"\n'
    assert not (tmp_path / "c" / "step_000003.pt.tmp").exists()


def test_rng_restore_replays_random_draws():
    state = capture_rng()
    a = (torch.rand(3), random.random())
    restore_rng(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_clone_state_is_deep():
    w = torch.ones(2)
    c = clone_state({"a": [w]})
    w.add_(1)
    assert torch.equal(c["a"][0], torch.ones(2))


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04garbage"], ids=["empty", "text", "zip"])
def test_corrupted_capsule(tmp_path, content):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CapsuleError, match="corrupted or not a capsule"):
        Capsule.load(p)


def test_missing_and_incompatible_capsules(tmp_path):
    with pytest.raises(CapsuleError, match="does not exist"):
        Capsule.load(tmp_path / "nope.pt")
    p = _capsule().save(tmp_path / "c.pt")
    blob = torch.load(p, weights_only=True)
    blob["version"] = CAPSULE_VERSION + 1
    torch.save(blob, p)
    with pytest.raises(CapsuleError, match="version"):
        Capsule.load(p)
    torch.save({"something": 1}, p)
    with pytest.raises(CapsuleError, match="not a risdiag capsule"):
        Capsule.load(p)


ROW = {"loss": 1.5, "loss/subspace": 0.9, "grad/_total": 3.0, "grad/encoder": 2.0,
       "mat/a:linalg.eigh/min_gap": 0.0, "mat/a:linalg.eigh/max_cluster": 118.0, "mat/a:linalg.eigh/vec_grad": 1.0,
       "mat/a:linalg.eigh/log10_cond": 3.0, "mat/b:linalg.eigvalsh/min_gap": 0.0,
       "mat/b:linalg.eigvalsh/vec_grad": 0.0, "mat/b:linalg.eigvalsh/log10_cond": 9.0}


def test_worst_matrices_rank_eigenvector_hazards_first():
    names = [name for name, _ in worst_matrices(ROW)]
    assert names == ["a:linalg.eigh", "b:linalg.eigvalsh"]


def test_dashboard_renders_rows():
    state = DashboardState(total_steps=10, step=4, row=ROW, nonfinite_steps=[3], last_event="non-finite at step 3")
    console = Console(record=True, width=120, force_terminal=False)
    console.print(build_dashboard(state))
    text = console.export_text()
    assert "a:linalg.eigh" in text and "118" in text and "subspace" in text and "step 4/10" in text
    assert "non-finite steps: 1" in text
    line = plain_line(state)
    assert "loss=1.5000" in line and "hazard=a:linalg.eigh gap=0 tied=118" in line


def test_live_view_is_off_without_tty(caplog):
    view = LiveView(total_steps=5, enabled=True, console=Console(force_terminal=False))
    assert view.enabled is False
    with caplog.at_level("INFO", logger="ris_stability.cli.live"), view:
        view.update(1, row=ROW)
    assert any("step 1/5" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("row, shown", [
    pytest.param({"mat/m:linalg.eigh/min_gap": 1e-15, "mat/m:linalg.eigh/max_cluster": 128.0,
                  "mat/m:linalg.eigh/vec_grad": 0.0, "mat/m:linalg.eigh/trace": 1.0}, "hazard=none",
                 id="eigenvalues-only-tie"),
    pytest.param({"mat/l:eigh_gap_aware/min_gap": 0.0, "mat/l:eigh_gap_aware/max_cluster": 124.0,
                  "mat/l:eigh_gap_aware/vec_grad": 1.0}, "hazard=none", id="tie-safe-backward"),
    pytest.param({**ROW, "mat/b:linalg.eigvalsh/trace": float("nan")}, "hazard=b:linalg.eigvalsh (non-finite input)",
                 id="non-finite-input-first"),
    pytest.param(ROW, "hazard=a:linalg.eigh gap=0 tied=118", id="eigenvectors-through-a-tie"),
])
def test_progress_line_shows_the_worst_hazard(row, shown):
    line = plain_line(DashboardState(total_steps=10, step=4, row={"loss": 1.0, **row}))
    assert line.endswith(shown), line


def test_plain_log_has_each_incident_kind_once_and_counts_repeats(caplog):
    view = LiveView(total_steps=100, enabled=False)
    with caplog.at_level("INFO", logger="ris_stability.cli.live"), view:
        for step in range(30):
            view.update(step, row=ROW)
            view.record("event", {"kind": "nonfinite_grad", "severity": "error", "step": step, "message": f"bad {step}"})
        view.record("event", {"kind": "capsule_written", "severity": "info", "step": 1, "message": "capsule"})
        view.record("event", {"kind": "gradient_spike", "severity": "warning", "step": 7, "message": "spike"})
    lines = [r.getMessage() for r in caplog.records]
    assert [m for m in lines if m.startswith("nonfinite_grad at step")] == ["nonfinite_grad at step 0: bad 0"]
    assert "gradient_spike at step 7: spike" in lines and not any("capsule" in m for m in lines)
    (repeat,) = [m for m in lines if m.startswith("nonfinite_grad: ")]
    assert repeat.startswith("nonfinite_grad: 29 more (all in events.jsonl), at steps 1, 2,") and "(+19 more)" in repeat
    progress = [m for m in lines if m.startswith("step ")]
    assert len(progress) == 15  # every 100 // 40 = 2 steps (0, 2, ..., 28), not once more per bad step
