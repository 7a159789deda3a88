"""Acceptance: a planted-fault suite of outside-style models. Every finding is right in phase, op, module,
line and cause; the clean model gives no finding."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ris_stability.locate import Locator

NEG_INF = float("-inf")


def _line(marker: str) -> str:
    lines = Path(__file__).read_text().splitlines()
    return f"test_planted_faults.py:{next(i for i, ln in enumerate(lines, 1) if ln.rstrip().endswith('# ' + marker))}"


# --- the models ----------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, keep):
        scores = (self.q(x) @ self.k(x).transpose(-1, -2)).masked_fill(~keep[:, None, :], NEG_INF)
        return torch.softmax(scores, dim=-1) @ x  # ATTN


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"attn": Attention()}) for _ in range(2)])

    def forward(self, x, keep):
        for layer in self.layers:
            x = x + layer["attn"](x, keep)
        return x.pow(2).mean()


class HalfNorm(nn.Module):
    """Normalises in float16: squares of 1e-5 underflow to 0, so the norm is 0."""

    def forward(self, x):
        h = x.half()
        norm = (h * h).sum(-1, keepdim=True).sqrt()
        return (h / norm).float()  # HALFDIV


class HalfNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = HalfNorm()

    def forward(self, x):
        return self.norm(self.proj(x) * 1e-5).pow(2).mean()


class Whitening(nn.Module):
    def forward(self, x):
        cov = x.mT @ x / x.shape[-2]
        evals, evecs = torch.linalg.eigh(cov)  # EIGH
        return x @ evecs / evals.clamp_min(1e-6).sqrt()


class WhiteNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.white = Whitening()

    def forward(self, x):
        return self.white(x * self.scale)[..., 0].pow(2).mean()


class Polar(nn.Module):
    def forward(self, a):
        u, s, vh = torch.linalg.svd(a)  # SVD
        return u @ vh


class PolarNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.diag(torch.tensor([2.0, 1.0, 1.0, 0.5])))
        self.polar = Polar()

    def forward(self, x):
        return (self.polar(self.w) @ x.mT)[0].sum()


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        if self.fn == "sqrt":
            return torch.sqrt(torch.relu(x) + (x - x.detach()))  # SQRT
        return torch.log(torch.relu(x))  # LOG


class Deep(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ModuleDict({"act": Act(fn)})["act"]))

    def forward(self, x):
        return self.blocks(x).sum()


class Chol(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        gram = h.mT @ h - 10.0 * torch.eye(4)  # indefinite by construction
        return torch.linalg.cholesky(gram)  # CHOL


class CholNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.factor = Chol()

    def forward(self, x):
        return self.factor(x).sum()


class Clean(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).pow(2).mean()


# --- the suite -------------------------------------------------------------------------------------------
def _masked_attention():
    torch.manual_seed(0)
    x, keep = torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)
    keep[1] = False
    return Encoder(), (x, keep)


def _tied_whitening():
    x = torch.zeros(8, 4)
    x[:4] = torch.eye(4) * 2.0  # covariance exactly 0.5 * I: all four eigenvalues tie
    x[4:] = -torch.eye(4) * 2.0
    return WhiteNet(), (x,)


def _with(model_cls, *args):
    def build():
        torch.manual_seed(0)
        return model_cls(*args), (torch.rand(6, 4) - 0.5,)
    return build


def _nan_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    x[2, 1] = math.nan
    return Clean(), (x,)


def _polar():
    return PolarNet(), (torch.randn(3, 4),)


CASES = {
    # id: (build, phase, op (prefix), module, line marker, words in the cause)
    "masked attention row": (_masked_attention, "forward", "aten._softmax", "model.layers.0.attn", "ATTN",
                             "entirely -inf: every key is masked"),
    "fp16 norm underflow": (_with(HalfNet), "forward", "aten.div", "model.norm", "HALFDIV",
                            "division by 0 in float16: the denominator is 0, most likely underflowed"),
    "tied-eigenvalue whitening": (_tied_whitening, "backward", "", "model.white", "EIGH", "tied eigenvalues"),
    "SVD polar with ties": (_polar, "backward", "", "model.polar", "SVD", "svd backward"),
    "sqrt at 0 deep": (_with(Deep, "sqrt"), "backward", "", "model.blocks.1.1", "SQRT", "sqrt backward at 0"),
    "log at 0 deep": (_with(Deep, "log"), "forward", "aten.log", "model.blocks.1.1", "LOG", "log of 0"),
    "NaN in the input batch": (_nan_batch, "input", "", "", None, "already holds 1 NaN"),
    "raising factorisation": (_with(CholNet), "error", "aten.linalg_cholesky", "model.factor", "CHOL",
                              "not positive definite"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_planted_fault_is_found_exactly(case):
    build, phase, op, module, marker, words = CASES[case]
    model, args = build()
    f = Locator(roots={"model": model}).run(model, *args)
    assert f is not None, case
    assert f.phase == phase, (case, f.phase, f.cause)
    assert f.op.startswith(op), (case, f.op)
    assert f.module == module, (case, f.module)
    if marker is None:
        assert f.location == "x"  # the bad argument's name
    else:
        assert f.location.endswith(_line(marker)), (case, f.location)
    assert words in f.cause, (case, f.cause)


def test_clean_model_has_no_finding():
    torch.manual_seed(0)
    model = Clean()
    assert Locator(roots={"model": model}).run(model, torch.randn(6, 4)) is None
