"""No dead code: every top-level function, class and constant of the two packages is used somewhere else
in the repository (the packages, tests, benchmarks, examples or the documentation)."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Public helpers kept on purpose although nothing in the repository calls them yet.
KEPT = {"ris_stability/monitor/amp.py": {"found_inf"},
        "ris_stability/sweep/target.py": {"TargetFactory"},  # the type a --target factory must have
        "ris_stability/observe/intercept.py": {"original_of"}}  # public: the torch function behind a stand-in


def _top_level_names(tree: ast.Module) -> list[tuple[str, int]]:
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append((node.name, node.lineno))
        elif isinstance(node, ast.Assign):
            names += [(t.id, node.lineno) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append((node.target.id, node.lineno))
    return [(n, line) for n, line in names if not n.startswith("__")]


def test_every_top_level_name_is_used():
    sources = {p: p.read_text() for d in ("ris_model", "ris_stability") for p in (ROOT / d).rglob("*.py")}
    others = [p for d in ("tests", "benchmarks", "examples") if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py")]
    others += list(ROOT.glob("*.md")) + list((ROOT / "docs").glob("*.md"))
    words = Counter(re.findall(r"\w+", "\n".join(sources.values()) + "\n".join(p.read_text() for p in others)))
    unused = []
    for path, text in sources.items():
        rel = str(path.relative_to(ROOT))
        for name, line in _top_level_names(ast.parse(text)):
            if name not in KEPT.get(rel, ()) and words[name] <= 1:
                unused.append(f"{rel}:{line} {name}")
    assert unused == []
