"""`ris_stability.watch`: skip leaves parameters and optimizer state bit-identical (SGD with momentum,
Adam, AdamW), training continues, results equal a run without the monitor, stop / observe policies."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ris_stability
from ris_stability.records.capsule import clone_state


class RowNorm(nn.Module):
    def forward(self, h):
        return h / (torch.sqrt((h * h).sum(-1, keepdim=True)) + 1.0)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(5, 5, bias=False), RowNorm())
        self.out = nn.Linear(5, 1)

    def forward(self, x):
        return self.out(self.inner(x))


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def batches(n: int, bad: set[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 5, generator=g) for _ in range(n)]
    for i in bad:
        xs[i][2] = 0.0  # a zero row: sqrt backward at 0 makes the gradients NaN, the loss stays finite
    return xs


def train(model, opt, xs, skip_at=(), snapshots=None):
    for i, x in enumerate(xs):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if snapshots is not None:
            snapshots.append((clone_state(model.state_dict()), clone_state(opt.state_dict())))
        if i not in skip_at:
            opt.step()


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_changes_neither_parameters_nor_optimizer_state(tmp_path, name):
    torch.manual_seed(0)
    model = Mlp()
    opt = OPTIMIZERS[name](model.parameters())
    xs, snaps = batches(7, bad={3}), []
    with ris_stability.watch(model, opt, out=tmp_path / "run", report=False) as w:
        train(model, opt, xs, snapshots=snaps)
    before, after = snaps[3], snaps[4]  # before step 3's update / before step 4's update
    assert same(before[0], after[0]) and same(before[1], after[1])  # bitwise: params, moments, step counts
    assert not same(snaps[4][0], snaps[5][0])  # training continues after the skipped step
    assert w.nonfinite_steps == [3] and w.skipped_steps == [3] and w.status == "nonfinite"
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if name != "sgd-momentum":
        assert int(opt.state[model.out.weight]["step"]) == 6  # 7 steps, one skipped


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_results_equal_a_run_without_the_monitor(tmp_path, name):
    """Clean steps, one skipped step and the armed (located) steps after it change no result."""
    runs = []
    for watched in (True, False):
        torch.manual_seed(0)
        model = Mlp()
        opt = OPTIMIZERS[name](model.parameters())
        xs = batches(7, bad={2})
        if watched:
            with ris_stability.watch(model, opt, out=tmp_path / "run", report=False):
                train(model, opt, xs)
        else:
            train(model, opt, xs, skip_at={2})
        runs.append((clone_state(model.state_dict()), clone_state(opt.state_dict())))
    assert same(runs[0][0], runs[1][0]) and same(runs[0][1], runs[1][1])


def test_hooks_are_removed_on_exit(tmp_path):
    from torch.optim import optimizer as optim_mod

    backward = torch.autograd.backward
    pre, post = len(optim_mod._global_optimizer_pre_hooks), len(optim_mod._global_optimizer_post_hooks)
    model = Mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ZeroDivisionError):
        with ris_stability.watch(model, opt, out=tmp_path / "run", report=False) as w:
            train(model, opt, batches(2, bad=set()))
            1 / 0
    assert torch.autograd.backward is backward
    assert (len(optim_mod._global_optimizer_pre_hooks), len(optim_mod._global_optimizer_post_hooks)) == (pre, post)
    assert not model._forward_pre_hooks
    assert w.status == "crashed"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "crashed"


def test_stop_policy_ends_the_block_after_locating(tmp_path):
    torch.manual_seed(0)
    model = Mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    done = []
    with ris_stability.watch(model, opt, out=tmp_path / "run", on_nonfinite="stop", report=False) as w:
        for i, x in enumerate(batches(8, bad={3, 4, 5, 6, 7})):
            train(model, opt, [x])
            done.append(i)
    assert w.status == "stopped" and done == [0, 1, 2, 3]  # step 4 located the fault, then stopped
    (step, finding), = w.findings
    assert step == 4 and finding.node == "SqrtBackward0" and finding.module == "model.inner.1"
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_observe_policy_lets_the_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = Mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ris_stability.watch(model, opt, out=tmp_path / "run", on_nonfinite="observe", report=False) as w:
        train(model, opt, batches(4, bad={2}))
    assert w.nonfinite_steps[0] == 2 and w.skipped_steps == []
    assert not bool(torch.isfinite(model.inner[0].weight).all())  # observed, not prevented


def test_discovers_the_model_without_being_told(tmp_path):
    torch.manual_seed(0)
    net = Mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    with ris_stability.watch(out=tmp_path / "run", report=False) as w:
        for x in batches(6, bad={2, 3, 4, 5}):  # the root is named after the variable of the calling frame
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    (step, finding), = w.findings
    assert step == 3 and finding.module == "net.inner.1" and finding.node == "SqrtBackward0"


def test_forward_fault_is_located_in_forward(tmp_path):
    """A log of a zero inside the model: the loss itself goes non-finite; the finding is the forward op."""

    class LogFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3, bias=False)

        def forward(self, x):
            return torch.log(self.lin(x).abs()).sum(-1)  # zero rows from step 2 on: log(0) = -inf

    torch.manual_seed(0)
    model = LogFeatures()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with ris_stability.watch(model, opt, out=tmp_path / "run", report=False) as w:
        for step in range(5):
            x = torch.randn(4, 3)
            if step >= 2:
                x[1] = 0.0
            loss = model(x).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.nonfinite_steps == [2, 3, 4]
    (step, finding), = w.findings
    assert (step, finding.phase, finding.op, finding.module) == (3, "forward", "aten.log", "model")
