"""The layers of ris_stability hold: no module-level import circle, no import from a lower layer up, and the
generic CLI imports ris_model only for ``--config`` runs.

The graph is read from the source with ``ast`` (every ``import`` / ``from ... import``, also inside functions),
so an import that runs only on some path counts too; imports under ``if TYPE_CHECKING:`` are exempt (they never
run). Circles are looked for among module-level imports only (a function-level import runs after every module
has loaded, so it cannot deadlock loading), with the implicit import of a package's ``__init__`` included.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "ris_stability"

# Low to high; a package may import its own layer's other packages one way only, and any lower layer.
LAYERS: tuple[frozenset[str], ...] = tuple(frozenset(layer) for layer in (
    {"spectral"}, {"numerics"}, {"observe", "records"}, {"linalg"}, {"locate"}, {"instruments"}, {"monitor"},
    {"sinks", "report"}, {"attach", "replay"}, {"sweep"}, {"cli", "integrations"}))
TOP = len(LAYERS)  # ris_stability/__init__.py: the public API, above every package

# Known violations, each owned by a change in progress on issue #25: the entry is removed with the fix (the
# test fails while an entry is no longer needed). (importing file, imported package) -> why it is still here.
ALLOWED: dict[tuple[str, str], str] = {
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    path: str  # its file, relative to the repository
    line: int
    target: str  # imported module, dotted (a submodule where ``from pkg import sub`` names one)
    module_level: bool  # runs when the importing module loads (not inside a function)


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` under ``root``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        anchor = source.split(".") if is_package else source.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def imports(root: Path, package: str) -> list[Import]:
    """Every import of ``package``'s modules, TYPE_CHECKING blocks left out."""
    known = modules(root, package)
    found: list[Import] = []
    for source, path in known.items():
        rel, is_package = str(path.relative_to(root)), path.name == "__init__.py"

        def visit(node: ast.AST, module_level: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for other in child.orelse:
                        visit(ast.Module(body=[other], type_ignores=[]), module_level)
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    found.extend(Import(source, rel, child.lineno, t, module_level)
                                 for t in _targets(child, source, is_package, known))
                inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), True)
    return found


def package_of(module: str) -> str:
    """The subpackage a module belongs to ('' for the top-level __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(package: str, layers=LAYERS) -> int:
    if package == "":
        return TOP
    return next(i for i, layer in enumerate(layers) if package in layer)


def circles(found: list[Import], package: str) -> list[list[str]]:
    """Module-level import circles among ``package``'s modules (strongly connected components > 1)."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        if not imp.module_level or not imp.target.startswith(package + ".") or imp.source == package:
            continue
        edges = graph.setdefault(imp.source, set())
        edges.add(imp.target)
        parts = imp.target.split(".")
        for i in range(2, len(parts)):  # importing a.b.c first runs a.b/__init__.py
            parent = ".".join(parts[:i])
            if not (imp.source == parent or imp.source.startswith(parent + ".")):
                edges.add(parent)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def layer_violations(found: list[Import], package: str, layers=LAYERS) -> list[tuple[str, str, str]]:
    """(file:line, imported package, why) for each import up the layers, between two packages of one layer
    that import each other, of the top-level package from inside, or of ris_model outside integrations/."""
    out = []
    inside = [i for i in found if i.target == package or i.target.startswith(package + ".")]
    pairs = {(package_of(i.source), package_of(i.target)) for i in inside}
    for imp in found:
        src = package_of(imp.source)
        if imp.target.split(".")[0] == "ris_model":
            if not imp.path.startswith(f"{package}/integrations/"):
                out.append((f"{imp.path}:{imp.line}", "ris_model", "ris_model outside integrations/"))
            continue
        if imp not in inside or src == "":
            continue
        dst = package_of(imp.target)
        if src == dst:
            continue
        low, high = layer_of(src, layers), layer_of(dst, layers)
        if high > low:
            out.append((f"{imp.path}:{imp.line}", dst, f"{src} (layer {low}) imports {dst or package} (layer {high})"))
        elif high == low and (dst, src) in pairs:
            out.append((f"{imp.path}:{imp.line}", dst, f"{src} and {dst} (one layer) import each other"))
    return out


def _unexpected(violations: list[tuple[str, str, str]]) -> list[str]:
    """The violations ALLOWED does not name; an allowed import one way also covers the way back (one circle)."""
    allowed_pairs = {frozenset((Path(f).parts[1], dst)) for f, dst in ALLOWED}
    out = []
    for where, dst, why in violations:
        path = where.rsplit(":", 1)[0]
        mutual = why.endswith("import each other") and frozenset((Path(path).parts[1], dst)) in allowed_pairs
        if (path, dst) not in ALLOWED and not mutual:
            out.append(f"{where} {why}")
    return out


# -- the rules on ris_stability ------------------------------------------------------------------------
def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in (ROOT / PACKAGE).iterdir() if (p / "__init__.py").is_file()}
    assert packages == set().union(*LAYERS), "place a new package in LAYERS (and in docs/architecture.md)"


def test_no_module_level_import_circle() -> None:
    assert circles(imports(ROOT, PACKAGE), PACKAGE) == []


def test_no_import_up_the_layers() -> None:
    assert _unexpected(layer_violations(imports(ROOT, PACKAGE), PACKAGE)) == []


def test_every_allowed_violation_still_exists() -> None:
    seen = {(where.rsplit(":", 1)[0], dst) for where, dst, _ in layer_violations(imports(ROOT, PACKAGE), PACKAGE)}
    assert [key for key in ALLOWED if key not in seen] == [], "fixed: remove the entry from ALLOWED"


# -- the checker itself, on a small package written for the purpose -------------------------------------
FAKE_LAYERS = (frozenset({"low"}), frozenset({"mid", "side"}), frozenset({"high"}))


def _fake(tmp_path: Path, files: dict[str, str]) -> list[Import]:
    for name, text in {"__init__.py": "", "low/__init__.py": "", "mid/__init__.py": "", "side/__init__.py": "",
                       "high/__init__.py": "", **files}.items():
        path = tmp_path / "fake" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return imports(tmp_path, "fake")


def test_checker_finds_a_module_level_circle_and_ignores_a_deferred_one(tmp_path: Path) -> None:
    found = _fake(tmp_path, {"low/a.py": "from fake.low import b\n", "low/b.py": "from . import a\n",
                             "mid/c.py": "def f():\n    from fake.mid import d\n", "mid/d.py": "import fake.mid.c\n"})
    assert circles(found, "fake") == [["fake.low.a", "fake.low.b"]]


def test_checker_counts_a_package_init_in_a_circle(tmp_path: Path) -> None:
    found = _fake(tmp_path, {"low/__init__.py": "from fake.low.a import x\n", "low/a.py": "import fake.mid.e\n",
                             "mid/e.py": "from fake.low.b import y\n", "low/b.py": "y = 1\n"})
    assert circles(found, "fake") == [["fake.low", "fake.low.a", "fake.mid.e"]]


@pytest.mark.parametrize("text, expected", [
    ("from fake.high import x\n", [("fake/low/m.py:1", "high")]),
    ("def f():\n    import fake.mid.n\n", [("fake/low/m.py:2", "mid")]),  # function level counts for layers
    ("from ..mid import n\n", [("fake/low/m.py:1", "mid")]),  # relative
    ("from fake import api\n", [("fake/low/m.py:1", "")]),  # the top-level API from inside (not a module)
    ("import ris_model.config\n", [("fake/low/m.py:1", "ris_model")]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fake.high import x\n", []),
    ("import typing\nif typing.TYPE_CHECKING:\n    import fake.high\nelse:\n    import fake.high.y\n",
     [("fake/low/m.py:5", "high")]),
], ids=["upward", "upward-in-function", "upward-relative", "top-level", "ris-model", "type-checking",
        "type-checking-else"])
def test_checker_finds_an_upward_import(tmp_path: Path, text: str, expected: list) -> None:
    found = _fake(tmp_path, {"low/m.py": text, "mid/n.py": "", "high/x.py": "", "high/y.py": ""})
    assert [(where, dst) for where, dst, _ in layer_violations(found, "fake", FAKE_LAYERS)] == expected


def test_checker_finds_one_layer_importing_itself_both_ways(tmp_path: Path) -> None:
    found = _fake(tmp_path, {"mid/n.py": "from fake.side import s\n", "side/s.py": "def f():\n    import fake.mid\n",
                             "high/h.py": "import fake.mid.n\n"})
    assert sorted(where for where, _, _ in layer_violations(found, "fake", FAKE_LAYERS)) == [
        "fake/mid/n.py:1", "fake/side/s.py:2"]


# -- the generic CLI does not load the showcase model ------------------------------------------------------
TINY_SCRIPT = """\
import torch
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(2):
    opt.zero_grad()
    model(torch.ones(4, 3)).pow(2).mean().backward()
    opt.step()
"""
PROBE = """\
import sys
from ris_stability.cli import main
code = main(sys.argv[1:])
print("RIS_MODEL_LOADED" if any(m.split(".")[0] == "ris_model" for m in sys.modules) else "RIS_MODEL_ABSENT", code)
"""


@pytest.mark.xfail(("ris_stability/cli/app.py", "ris_model") in ALLOWED, strict=True,
                   reason=ALLOWED.get(("ris_stability/cli/app.py", "ris_model"), ""))
@pytest.mark.parametrize("argv", [["report", "{tmp}/not-a-run"], ["trace", "--out", "{tmp}/run", "--no-live",
                                                                   "--no-report", "--", "python", "{tmp}/tiny.py"]],
                         ids=["report", "trace-script"])
def test_generic_commands_do_not_import_ris_model(tmp_path: Path, argv: list[str]) -> None:
    (tmp_path / "tiny.py").write_text(TINY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", PROBE, *(a.format(tmp=tmp_path) for a in argv)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert "RIS_MODEL_" in proc.stdout, proc.stderr[-2000:]
    assert "RIS_MODEL_ABSENT" in proc.stdout, proc.stdout[-2000:]
