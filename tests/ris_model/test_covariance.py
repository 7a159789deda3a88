"""Layering: THE covariance builder is the only place R_blend is formed; ris_model imports only ris_stability.spectral.

These read the source (AST and text), so a second blend or a reverse import anywhere fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from ris_model.config import CovarianceConfig
from ris_model.covariance import build_covariances

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ris_model", "ris_stability")
BUILDER = ROOT / "ris_model" / "covariance.py"
CONFIG = ROOT / "ris_model" / "config.py"

# Ways to write a convex blend with beta: "beta * X", "X * beta", "(1 - beta)", and a blend helper call.
BLEND_PATTERNS = [
    re.compile(r"\bbeta\s*\*"), re.compile(r"\*\s*[\w.]*\bbeta\b"), re.compile(r"1(\.0)?\s*-\s*[\w.]*\bbeta\b"),
    re.compile(r"torch\.lerp\("), re.compile(r"\.lerp\("),
]


def _sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Source lines without comments and docstrings (only code can form a matrix)."""
    tree = ast.parse(path.read_text())
    doc_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            doc_lines.update(range(node.lineno, node.end_lineno + 1))
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if i not in doc_lines:
            out.append((i, line.split("#", 1)[0]))
    return out


def test_only_the_builder_blends():
    offenders = []
    for path in _sources(*PACKAGES):
        if path in (BUILDER, CONFIG):
            continue
        for i, line in _code_lines(path):
            if any(p.search(line) for p in BLEND_PATTERNS):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == [], "R_blend formed outside ris_model/covariance.py:\n" + "\n".join(offenders)


def test_the_builder_blends_exactly_once():
    hits = [line for _, line in _code_lines(BUILDER) if any(p.search(line) for p in BLEND_PATTERNS)]
    assert len(hits) == 1 and "R_blend" in hits[0]


def test_grep_catches_a_planted_second_blend(tmp_path):
    planted = tmp_path / "rogue.py"
    planted.write_text("def f(p, s, cfg):\n    return (1 - cfg.beta) * p + cfg.beta * s\n")
    assert any(p.search(line) for _, line in _code_lines(planted) for p in BLEND_PATTERNS)


@pytest.mark.parametrize("module", ["loss.py", "infer.py"])
def test_loss_and_inference_call_the_builder(module):
    tree = ast.parse((ROOT / "ris_model" / module).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "build_covariances"]
    assert calls, f"ris_model/{module} must form its covariances with build_covariances"


def test_ris_model_imports_only_the_leaf_op_library_of_ris_stability():
    offenders, used = [], []
    for path in _sources("ris_model"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            toolkit = [n for n in names if n.split(".")[0] == "ris_stability"]
            used += toolkit
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in toolkit if n != "ris_stability.spectral"]
    assert offenders == []
    assert "ris_stability.spectral" in used  # the gap-aware eigh lives in the toolkit, once


@pytest.mark.parametrize("module", ["loss.py", "model.py", "train.py", "infer.py", "checkpoint.py"])
def test_no_sanitising_or_swallowing(module):
    """No nan_to_num, and no handler that turns an arbitrary exception into a value."""
    tree = ast.parse((ROOT / "ris_model" / module).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "nan_to_num"]
    for handler in (n for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler)):
        caught = ast.unparse(handler.type) if handler.type is not None else "<bare>"
        assert caught not in ("<bare>", "Exception", "BaseException") or any(
            isinstance(s, ast.Raise) for s in handler.body), f"{module}: except {caught} without re-raise"


def test_builder_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    fa = torch.randn(2, 12, 3, dtype=torch.complex128, generator=gen)
    fr = torch.randn(2, 12, 3, dtype=torch.complex128, generator=gen)
    x = torch.randn(2, 12, 4, dtype=torch.complex128, generator=gen)
    samp = x @ x.mH
    samp = samp / samp.diagonal(dim1=-2, dim2=-1).real.sum(-1)[:, None, None]
    cfg = CovarianceConfig(lambda_range=0.3, beta=0.3, shrinkage=0.1)
    cov = build_covariances(fa, fr, samp, cfg)
    pred = fa @ fa.mH + 0.3 * fr @ fr.mH
    pred = pred / pred.diagonal(dim1=-2, dim2=-1).real.sum(-1)[:, None, None]
    blend = 0.7 * pred + 0.3 * samp
    eff = 0.9 * blend + 0.1 / 12 * torch.eye(12)
    assert torch.allclose(cov.pred, pred) and torch.allclose(cov.blend, blend) and torch.allclose(cov.eff, eff)
