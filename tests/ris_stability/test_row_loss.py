"""A step that is not sampled still counts its own loss (summary.json's final and best loss, the step
count), under skip and observe, with gradient accumulation too: its value comes with the step's verdict when
the verdict carried it, else it is read with the step's row."""
import json

import pytest
import torch

from ris_stability import watch

SCALES = [5.0, 4.0, 3.0, 2.0, 6.0, 1.0, 7.0]  # every=4: steps 0 and 4 sampled; best at 5, last at 6 (not sampled)


def _train(tmp_path, policy: str, micro: int) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(5, 6)
    losses = []
    with watch(model, opt, out=tmp_path, report=False, on_nonfinite=policy, every=4):
        for scale in SCALES:
            opt.zero_grad()
            total = 0.0
            for _ in range(micro):
                loss = (model(x) - x[:, :1]).pow(2).mean() * scale
                loss.backward()
                total += loss.item()
            opt.step()
            losses.append(total)
    return losses


@pytest.mark.parametrize("policy", ["skip", "observe"])
@pytest.mark.parametrize("micro", [1, 2])
def test_a_step_not_sampled_counts_its_own_loss(tmp_path, policy, micro):
    losses = _train(tmp_path, policy, micro)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == len(SCALES)
    assert summary["final_loss"] == pytest.approx(losses[-1], rel=1e-6, abs=0)
    assert summary["best_loss"] == pytest.approx(min(losses), rel=1e-6, abs=0)
    assert min(losses) == losses[5] and losses[5] < losses[3]  # the best is a step that is not sampled
