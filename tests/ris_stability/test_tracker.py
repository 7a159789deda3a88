"""The one module tracker: one naming rule for the probe, the alignment capture and the locator."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch.nn.modules.module as module_mod
from ris_stability.instruments.alignment import MatrixCapture
from ris_stability.locate import Locator
from ris_stability.instruments.probe import SpectralProbe
from ris_stability.observe.tracker import ModuleTracker


class Leaf(nn.Module):
    """Records the tracker's answer and runs a linalg call (seen by every instrument)."""

    def __init__(self, tracker_box: list):
        super().__init__()
        self.box = tracker_box

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        if self.box:
            self.box.append(self.box[0].current())
        return torch.linalg.eigvalsh(r).sqrt().sum()  # NaN from finite input when r < 0


class Middle(nn.Module):
    def __init__(self, box: list):
        super().__init__()
        self.leaf = Leaf(box)

    def forward(self, r):
        return self.leaf(r)


class Top(nn.Module):
    def __init__(self, box: list):
        super().__init__()
        self.body = Middle(box)

    def forward(self, r):
        # A module built inside forward is no submodule of anything: named by its class under its caller.
        return self.body(r) + nn.Identity()(r).sum() * 0 + Leaf(self.body.leaf.box)(r)


def _names(roots_of) -> list[str]:
    box: list = []
    top = Top(box)
    box.append(ModuleTracker(roots_of(top)))
    top(torch.eye(3, dtype=torch.float64))
    return box[1:]


@pytest.mark.parametrize("roots_of, expected", [
    (lambda top: {"model": top}, ["model.body.leaf", "model.Leaf"]),
    (lambda top: {"a": top.body, "b": top}, ["a.leaf", "b.Leaf"]),           # the first root that reaches it
    (lambda top: {"m": top.body.leaf}, ["m", "Top.Leaf"]),                    # unnamed outermost: its class
    (lambda top: {}, ["Top.body.leaf", "Top.Leaf"]),
], ids=["one-root", "first-root-wins", "root-below-an-unnamed-caller", "no-roots"])
def test_naming_rule(roots_of, expected):
    assert _names(roots_of) == expected


def test_tracker_installs_no_hooks_and_is_empty_outside_modules():
    hooks = (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks))
    tracker = ModuleTracker({"model": Top([])})
    assert tracker.current() == "" and tracker.running() == []
    assert (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks)) == hooks


class Raising(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Identity(), _Boom())

    def forward(self, x):
        return self.inner(x)


class _Boom(nn.Module):
    def forward(self, x):
        raise FloatingPointError("planted")


def test_a_raising_module_is_named_from_the_traceback_and_leaves_no_stale_stack():
    model = Raising()
    tracker = ModuleTracker({"model": model})
    with pytest.raises(FloatingPointError) as info:
        model(torch.ones(1))
    assert tracker.of_traceback(info.value.__traceback__) == "model.inner.1"
    assert tracker.current() == ""  # nothing left behind by the raise


def test_probe_alignment_and_locator_name_the_same_module_alike():
    model = Top([])
    roots = {"model": model.body}
    r = torch.eye(3, dtype=torch.float64)
    with SpectralProbe(roots=roots) as probe:
        model(r)
    probe_modules = {rec["module"] for rec in probe.collect().values()}
    with MatrixCapture(roots=roots) as capture:
        model(r)
    capture_modules = {rec.consumer for rec in capture.records}
    assert probe_modules == capture_modules == {"model.leaf", "Top.Leaf"}
    finding = Locator(roots=roots).run(lambda: model.body(-r))
    assert finding is not None and finding.op.startswith("aten.sqrt") and finding.module == "model.leaf"
