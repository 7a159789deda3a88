"""What a catastrophic gradient explosion tells the user in its event: the capsule written for it and the command
that checks it (with the replayer flag a script run needs, unless a replayer was given), then what the policy
did. Public front door only (watch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ris_stability
from ris_stability.records import read_trace


def _explode(tmp_path: Path, **settings) -> dict:
    """SGD at lr 3e-3 on a quartic loss far from its target: the gradient of step 0 is catastrophic."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=3e-3)
    x = torch.randn(32, 8)
    with ris_stability.watch(model, opt, out=tmp_path / "run", report=False, **settings):
        for _ in range(2):
            loss = (model(x) - 10.0).pow(4).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    trace = read_trace(tmp_path / "run")
    (event,) = [e for e in trace.events if e["kind"] == "gradient_explosion" and e["step"] == 0]
    (capsule,) = [p for p in trace.capsules if p.name == "step_000000.pt"]
    return {"event": event, "capsule": capsule}


@pytest.mark.parametrize("replayer", ["", "mypkg.replay:step"])
def test_an_explosion_event_names_its_capsule_and_the_command_that_checks_it(tmp_path: Path, replayer) -> None:
    got = _explode(tmp_path, on_explosion="skip", replayer=replayer)
    event, capsule = got["event"], got["capsule"]
    command = f"`risdiag bisect --precision {capsule}`" if replayer else (
        f"`risdiag bisect --precision {capsule} --replayer module:function` (a replayer you write: docs/script.md)")
    tail = f"; capsule written: check the gradient with {command}; step skipped (on_explosion='skip'): parameters " \
           "and optimizer state unchanged"
    assert event["severity"] == "error" and event["message"].endswith(tail)
    assert event["data"]["policy"] == "skip"
