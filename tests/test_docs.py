"""The documentation ships with the repository and says what the code does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        files = [p for p in ROOT.rglob("*") if ".git" not in p.parts]
    return [p for p in files if p.suffix in (".md", ".py", ".toml", ".sh") and p.is_file()]


def test_nothing_points_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in tracked_text_files()
                 if re.search(r"\.\./shared|DOMAIN\.md|DESIGN\.md", p.read_text(encoding="utf-8", errors="replace"))
                 and p.name != "test_docs.py"]
    assert offenders == []


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md", "docs/physics.md"])
def test_relative_links_resolve(doc):
    path = ROOT / doc
    links = [link for link in LINK.findall(path.read_text()) if "://" not in link]
    missing = [link for link in links if not (path.parent / link).exists()]
    assert missing == []


def test_readme_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert "docs/architecture.md" in readme and "docs/physics.md" in readme


PRIVATE = re.compile(r'torch\._C\b|torch\.utils\._\w+|torch\._foreach_\w+|[."]_orig_mod\b|'
                     r'[."]_compiled_call_impl|_forward_cls|\._saved_\w+|_per_optimizer_states|"_scale"')
# Where docs/architecture.md (and the locate package docstring) say private torch APIs are used.
DOCUMENTED_PRIVATE = ("ris_stability/locate/", "ris_stability/instruments/grads.py", "ris_stability/numerics/norms.py",
                      "ris_stability/observe/loopstack.py", "ris_stability/monitor/amp.py")


def test_private_torch_apis_are_only_where_the_docs_say():
    users = sorted({str(p.relative_to(ROOT)) for p in (ROOT / "ris_stability").rglob("*.py")
                    if PRIVATE.search(p.read_text())})
    assert users and all(u.startswith(DOCUMENTED_PRIVATE) for u in users), users
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    for place in DOCUMENTED_PRIVATE:
        place = place.removeprefix("ris_stability/")
        assert place in architecture


def test_tests_do_not_depend_on_the_current_folder():
    """Config paths in tests come from __file__, so `pytest --rootdir` works from any folder."""
    # a relative config path passed to something (a metadata value such as "config_path": "configs/x.toml" is
    # only text)
    relative = re.compile(r"""(?<!: )["'](?:\./)?configs/[\w-]+\.toml["']|chdir\(ROOT\)""")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "tests").rglob("*.py")) if p.name != "test_docs.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if relative.search(line)]
    assert offenders == []
