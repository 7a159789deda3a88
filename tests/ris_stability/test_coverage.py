"""Every linear-algebra entry point with a spectral hazard is observed and explained in its own words;
run folders hold no absolute path."""
import importlib.util
import math
import os
import textwrap
from pathlib import Path

import pytest
import torch

from ris_stability.linalg import registry
from ris_stability.linalg.hazards import tie_message
from ris_stability.linalg.site_names import split_site
from ris_stability import MonitorSession, StabilityMonitor
from ris_stability.instruments.probe import SpectralProbe
from ris_stability.report.build import build_report

torch.manual_seed(0)
_A = torch.randn(3, 5, 5, dtype=torch.float64)
_S = _A @ _A.mT + torch.eye(5, dtype=torch.float64)

# (id, call, recorded op name); every call looks its function up at call time, as user code does.
CALLS = [
    ("eigh", lambda: torch.linalg.eigh(_S), "linalg.eigh"),
    ("eigvalsh", lambda: torch.linalg.eigvalsh(_S), "linalg.eigvalsh"),
    ("eig", lambda: torch.linalg.eig(_A), "linalg.eig"),
    ("eigvals", lambda: torch.linalg.eigvals(_A), "linalg.eigvals"),
    ("svd", lambda: torch.linalg.svd(_A), "linalg.svd"),
    ("torch.svd", lambda: torch.svd(_A), "svd"),
    ("Tensor.svd", lambda: _A.svd(), "svd"),
    ("svdvals", lambda: torch.linalg.svdvals(_A), "linalg.svdvals"),
    ("matrix_norm-2", lambda: torch.linalg.matrix_norm(_A, ord=2), "linalg.matrix_norm(ord=2)"),
    ("matrix_norm--2", lambda: torch.linalg.matrix_norm(_A, ord=-2), "linalg.matrix_norm(ord=-2)"),
    ("matrix_norm-nuc", lambda: torch.linalg.matrix_norm(_A, ord="nuc"), "linalg.matrix_norm(ord=nuc)"),
    ("norm-2", lambda: torch.linalg.norm(_A[0], 2), "linalg.norm(ord=2)"),
    ("norm-nuc-dim", lambda: torch.linalg.norm(_A, "nuc", dim=(-2, -1)), "linalg.norm(ord=nuc)"),
    ("torch.norm-nuc", lambda: torch.norm(_A[0], p="nuc"), "norm(ord=nuc)"),
    ("Tensor.norm-nuc", lambda: _A[0].norm(p="nuc"), "norm(ord=nuc)"),
    ("cond", lambda: torch.linalg.cond(_A), "linalg.cond"),
    ("det", lambda: torch.linalg.det(_A), "linalg.det"),
    ("torch.det", lambda: torch.det(_A), "det"),
    ("Tensor.det", lambda: _A.det(), "det"),
    ("slogdet", lambda: torch.linalg.slogdet(_A), "linalg.slogdet"),
    ("Tensor.slogdet", lambda: _A.slogdet(), "slogdet"),
    ("logdet", lambda: torch.logdet(_S), "logdet"),
    ("inv", lambda: torch.linalg.inv(_A), "linalg.inv"),
    ("torch.inverse", lambda: torch.inverse(_A), "inverse"),
    ("Tensor.inverse", lambda: _A.inverse(), "inverse"),
    ("solve", lambda: torch.linalg.solve(_A, _A), "linalg.solve"),
    ("lstsq", lambda: torch.linalg.lstsq(_A, _A), "linalg.lstsq"),
    ("pinv", lambda: torch.linalg.pinv(_A), "linalg.pinv"),
    ("Tensor.pinverse", lambda: _A.pinverse(), "pinverse"),
    ("cholesky", lambda: torch.linalg.cholesky(_S), "linalg.cholesky"),
    ("Tensor.cholesky", lambda: _S.cholesky(), "cholesky"),
    ("lu_factor", lambda: torch.linalg.lu_factor(_A), "linalg.lu_factor"),
    ("lu", lambda: torch.linalg.lu(_A), "linalg.lu"),
    ("matrix_rank", lambda: torch.linalg.matrix_rank(_A), "linalg.matrix_rank"),
    ("qr", lambda: torch.linalg.qr(_A), "linalg.qr"),
]


@pytest.mark.parametrize("call,op", [c[1:] for c in CALLS], ids=[c[0] for c in CALLS])
def test_entry_point_observed_and_explained(call, op):
    with SpectralProbe() as probe:
        call()
    records = probe.collect()
    assert [r["op"] for r in records.values()] == [op]
    (rec,) = records.values()
    assert rec["stats"]["n"] in (5.0, 3.0) and rec["location"].endswith("test_coverage.py:" + rec["location"].split(":")[-1])
    words = registry.info(op)
    assert words is not None and words.hazard and words.units


@pytest.mark.parametrize("call", [lambda: torch.linalg.matrix_norm(_A), lambda: torch.linalg.norm(_A[0]),
                                  lambda: _A.norm(), lambda: torch.norm(_A[0], p=2),
                                  lambda: torch.linalg.norm(_A[0, 0], 2)],
                         ids=["matrix_norm-fro", "norm-fro", "Tensor.norm", "torch.norm-p2", "vector-norm"])
def test_norms_without_a_spectral_hazard_are_not_recorded(call):
    with SpectralProbe() as probe:
        call()
    assert probe.collect() == {}


def test_norm_orders_report_the_gap_they_depend_on():
    s = torch.tensor([4.0, 4.0, 1.0, 0.5], dtype=torch.float64)  # s1 tied: the spectral norm's gradient is undefined
    a = torch.diag(s)
    with SpectralProbe() as probe:
        torch.linalg.matrix_norm(a, ord=2)
        torch.linalg.matrix_norm(a, ord=-2)
    recs = {r["op"]: r["stats"] for r in probe.collect().values()}
    assert recs["linalg.matrix_norm(ord=2)"]["gap_split"] == 0.0  # s1^2 - s2^2
    assert recs["linalg.matrix_norm(ord=-2)"]["gap_split"] == pytest.approx(1.0 - 0.25)  # s3^2 - s4^2


def test_each_hazard_in_its_own_words():
    svd = tie_message("m:linalg.svd", "linalg.svd", "f.py:1", 3, 0.5)
    eigh = tie_message("m:linalg.eigh", "linalg.eigh", "f.py:1", 3, 0.5)
    assert "singular values tie" in svd and "singular vectors" in svd and "s_j^2 - s_i^2" in svd
    assert "eigenvalues tie" in eigh and "eigenvectors" in eigh and "lambda_j - lambda_i" in eigh
    assert registry.info("linalg.matrix_norm(ord=2)").units.startswith("top gap")
    assert registry.info("linalg.matrix_norm(ord=nuc)") != registry.info("linalg.matrix_norm(ord=-2)")
    assert "determinant" in registry.info("det").hazard and registry.info("slogdet") is registry.info("logdet")


OUTSIDE_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Whitening(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            cov = h.T @ h / h.shape[0] + 1e-3 * torch.eye(4)
            evals, evecs = torch.linalg.eigh(cov)
            u, s, vh = torch.linalg.svd(h[:4])
            return (h @ evecs / evals.sqrt()).pow(2).mean() + s.sum() * 0 + torch.linalg.matrix_norm(cov, ord=2)
''')


def test_no_absolute_path_in_a_run_folder(tmp_path, monkeypatch):
    """Model code outside any project (a script folder), run folder elsewhere, cwd elsewhere again."""
    code, run, cwd = tmp_path / "outside", tmp_path / "run", tmp_path / "cwd"
    code.mkdir(), cwd.mkdir()
    (code / "whiten.py").write_text(OUTSIDE_MODEL)
    monkeypatch.chdir(cwd)
    spec = importlib.util.spec_from_file_location("whiten_outside", code / "whiten.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.Whitening()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with MonitorSession(StabilityMonitor(run), model, opt) as s:
        for step in range(3):
            x = torch.randn(16, 4)
            s.start_step(step, x)
            loss = model(x) * (math.nan if step == 1 else 1.0)
            s.after_forward(loss)
            loss.backward()
            if s.after_backward():
                opt.step()
            opt.zero_grad()
            s.end_step()
    build_report(run)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and (run / "report.md").exists()
    needles = {str(tmp_path), os.path.expanduser("~"), str(Path(__file__).resolve().parents[2])}
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, f"{needle} in {path.relative_to(run)}"
    steps = (run / "steps.jsonl").read_text()
    assert "whiten.py:" in steps or "whiten.py:" in (run / "events.jsonl").read_text()


@pytest.mark.parametrize("name,parts", [
    ("model.attn:linalg.svd", ("model.attn", "linalg.svd", "", "")),
    ("model:linalg.svd[3x3]", ("model", "linalg.svd", "3x3", "")),
    ("loss.sub:linalg.eigh@src/pkg/loss.py:174", ("loss.sub", "linalg.eigh", "", "src/pkg/loss.py:174")),
    ("linalg.matrix_norm(ord=2)", ("", "linalg.matrix_norm(ord=2)", "", "")),
], ids=["plain", "shape", "location", "no-module"])
def test_site_names_split_unambiguously(name, parts):
    assert split_site(name) == parts
