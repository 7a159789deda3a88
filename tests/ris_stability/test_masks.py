"""Intentional -inf (attention masks) versus the NaN they turn into: the locator blames the NaN."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from ris_stability.locate import Locator, locate_nonfinite
from ris_stability.locate.reproducer import export_reproducer

ROOT = Path(__file__).resolve().parents[2]
NEG_INF = float("-inf")


class MaskedAttention(nn.Module):
    """Single-head attention; ``style`` picks how the padding mask is applied."""

    def __init__(self, style: str, d: int = 8):
        super().__init__()
        self.style = style
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, keep, additive=None, weight=None):
        scores = self.q(x) @ self.k(x).transpose(-1, -2)
        if self.style == "masked_fill":
            scores = scores.masked_fill(~keep[:, None, :], NEG_INF)  # MASKED_FILL LINE
        elif self.style == "where":
            scores = torch.where(keep[:, None, :], scores, NEG_INF)  # WHERE LINE
        else:
            scores = scores + additive[:, None, :]
        if weight is not None:
            scores = scores * weight  # WEIGHT LINE
        w = torch.softmax(scores, dim=-1)  # SOFTMAX LINE
        return w @ x


class Encoder(nn.Module):
    def __init__(self, style: str):
        super().__init__()
        self.block = nn.ModuleDict({"attn": MaskedAttention(style)})

    def forward(self, x, keep, additive=None):
        return self.block["attn"](x, keep, additive).pow(2).mean()


def _line(marker: str) -> int:
    text = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(text, 1) if marker in line and "_line(" not in line)


def _batch(fully_masked: bool):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8)
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1, 2:] = False
    if fully_masked:
        keep[2] = False
    additive = torch.zeros(3, 4).masked_fill(~keep, NEG_INF)
    return x, keep, additive


@pytest.mark.parametrize("style", ["masked_fill", "where", "additive"])
def test_fully_masked_row_blames_softmax_not_the_mask(style):
    model = Encoder(style)
    x, keep, additive = _batch(fully_masked=True)
    f = Locator(roots={"model": model}).run(lambda: model(x, keep, additive))
    assert f is not None and f.phase == "forward"
    assert f.op == "aten._softmax" and f.function == "torch.softmax"
    assert f.module == "model.block.attn"
    assert f.location.endswith(f"test_masks.py:{_line('SOFTMAX LINE')}")
    assert f.cause == ("softmax over a row that is entirely -inf: every key is masked (4 of 4 entries -inf, "
                       "exp(-inf - -inf) = NaN)")
    assert f.culprit == "row (2, 0, :) of the input: all 4 entries are -inf -> NaN"
    assert f.context == CONTEXTS[style].format(line=_line(MARKERS.get(style, "-")))
    assert f.output.nan == 16  # the fully masked sample's 4 x 4 weights


# Where the -inf came from, in the words of each style: written by an op of the model (its line and module), or
# brought in by an argument holding only -inf (an additive mask).
MARKERS = {"masked_fill": "MASKED_FILL LINE", "where": "WHERE LINE"}
CONTEXTS = {
    "masked_fill": "the mask values (-inf) were written on purpose by aten.masked_fill.Scalar "
                   "(torch.Tensor.masked_fill) at tests/ris_stability/test_masks.py:{line} in model.block.attn",
    "where": "the mask values (-inf) were written on purpose by aten.scalar_tensor (torch.where) at "
             "tests/ris_stability/test_masks.py:{line} in model.block.attn",
    "additive": "the infinite values came from a tensor holding only -inf (an additive mask or a mask constant), "
                "first used by aten.add.Tensor",
}


@pytest.mark.parametrize("style", ["masked_fill", "where", "additive"])
def test_partially_masked_rows_are_clean(style):
    """Rows with some keys masked hold -inf on purpose and softmax to finite weights: no finding. When the same
    masked scores are scaled by a zero weight, 0 * -inf is the fault (the mask is its context, never the origin);
    a real fault later in the step (log of negative values) is named as itself."""
    model = Encoder(style)
    attn = model.block["attn"]
    x, keep, additive = _batch(fully_masked=False)
    assert Locator(roots={"model": model}).run(lambda: model(x, keep, additive)) is None

    zero = torch.zeros(4)
    f = Locator(roots={"model": model}).run(lambda: attn(x, keep, additive, weight=zero).pow(2).mean())
    assert f is not None and f.op == "aten.mul.Tensor" and f.phase == "forward"
    assert f.location.endswith(f"test_masks.py:{_line('WEIGHT LINE')}") and f.module == "model.block.attn"
    assert f.cause == "0 * inf in mul: a masked (infinite) value multiplied by 0 gives NaN"
    assert f.context == CONTEXTS[style].format(line=_line(MARKERS.get(style, "-")))

    def loss():
        out = attn(x, keep, additive)
        return torch.log(out.pow(2).mean(-1) - 100.0).sum()  # LATER FAULT LINE

    f = Locator(roots={"model": model}).run(loss)
    assert f is not None and f.op == "aten.log" and f.phase == "forward"
    assert f.location.endswith(f"test_masks.py:{_line('LATER FAULT LINE')}")
    assert not f.context and "-inf" not in f.cause


def test_a_partly_masked_row_with_a_supplied_inf_is_not_called_all_minus_inf():
    """A row with two keys masked (-inf) and one set to +inf on purpose: softmax makes NaN from the +inf, and the
    finding describes the row as it is (2 of 4 entries -inf), not as a fully masked one."""
    def fn(x, keep, hot):
        scores = x.masked_fill(~keep, NEG_INF).masked_fill(hot, float("inf"))
        return torch.softmax(scores, dim=-1).sum()  # HOT SOFTMAX LINE

    x = torch.randn(2, 4, requires_grad=True)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1, :2] = False
    hot = torch.zeros(2, 4, dtype=torch.bool)
    hot[1, 3] = True
    f = locate_nonfinite(fn, x, keep, hot)
    assert f.op == "aten._softmax" and f.location.endswith(f"test_masks.py:{_line('HOT SOFTMAX LINE')}")
    assert f.cause == "softmax over a row holding +inf (inf - inf = NaN)"
    assert f.culprit == "row (1, :) of the input: max inf, min -inf, 2 of 4 -inf -> NaN"


def test_a_computed_inf_is_still_the_origin():
    """log(0) = -inf is a fault even when a later 0 * -inf is what makes the NaN."""
    def fn(x):
        y = torch.log(x)  # LOG LINE
        return (y * torch.zeros_like(y)).sum()
    x = torch.tensor([1.0, 0.0, 2.0], requires_grad=True)
    f = locate_nonfinite(fn, x)
    assert f.op == "aten.log" and f.location.endswith(f"test_masks.py:{_line('LOG LINE')}") and not f.context


def test_mask_reaching_the_loss_is_reported_as_itself():
    def fn(x, keep):
        return torch.logsumexp(x.masked_fill(~keep, NEG_INF), dim=-1).sum()
    x = torch.randn(2, 3, requires_grad=True)
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[0] = False
    f = locate_nonfinite(fn, x, keep)
    assert f.op == "aten.masked_fill.Scalar" and "reached the loss" in f.cause


def test_reproducer_reproduces_the_nan(tmp_path):
    model = Encoder("masked_fill")
    x, keep, additive = _batch(fully_masked=True)
    f = Locator(roots={"model": model}).run(lambda: model(x, keep, additive))
    replayed = types.SimpleNamespace(model=model, loss=lambda: model(x, keep, additive))
    export_reproducer(f, replayed, tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(tmp_path / "reproduce.py")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("forward:"))
    nonfinite, nan = int(line.split()[1]), int(line.split("(")[1].split()[0])
    # softmax of the fully masked sample: its 4 x 4 weights are NaN; the mask's -inf are not reproduced.
    assert nonfinite == nan == 16, run.stdout
