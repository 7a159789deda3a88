"""The user's source lines: "file.py:LINE" of the frames outside torch and outside ris_stability.

The toolkit's own instruments (modes, hooks) sit between the user's call and the op, so both torch's
and this package's frames are skipped; paths are shown relative to the project root (see ``_short_path``), never absolute.
"""
from __future__ import annotations

import functools
import os
import sys
from types import FrameType

import torch

_SKIP_DIRS = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
              os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)
MAX_STACK = 8  # user frames kept per op: enough to reach the model code from a helper


@functools.lru_cache(maxsize=4096)
def _is_user(filename: str) -> bool:
    # frozen stdlib modules (runpy, which runs a traced script) are never the user's code; cached: the
    # locator asks for every frame of every op, and abspath is the cost
    return not filename.startswith("<frozen ") and not os.path.abspath(filename).startswith(_SKIP_DIRS)


_ROOT_MARKERS = ("pyproject.toml", "setup.py", "setup.cfg", ".git")


@functools.lru_cache(maxsize=4096)
def _project_root(folder: str) -> str | None:
    """The nearest folder at or above ``folder`` holding a project marker (pyproject.toml, setup.py, .git)."""
    while True:
        if any(os.path.exists(os.path.join(folder, m)) for m in _ROOT_MARKERS):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


@functools.lru_cache(maxsize=4096)
def _short_path(filename: str) -> str:
    """A portable name for a source file: relative to its project root (the folder with pyproject.toml /
    setup.py / .git), else to the sys.path entry holding it (an installed package), else its base name.
    Never absolute, so run folders and findings read the same on every machine."""
    if filename.startswith("<") or not os.path.isabs(filename) and not os.path.exists(filename):
        return filename
    path = os.path.abspath(filename)
    root = _project_root(os.path.dirname(path))
    if root is None:
        entries = sorted((os.path.abspath(e) for e in sys.path if e), key=len, reverse=True)
        root = next((e for e in entries if path.startswith(e + os.sep)), None)
    rel = os.path.relpath(path, root) if root is not None else os.path.basename(path)
    return rel.replace(os.sep, "/")


def user_stack(frame: FrameType | None = None, limit: int = MAX_STACK) -> tuple[str, ...]:
    """Up to ``limit`` user frames, innermost first, starting at ``frame`` (default: the caller's)."""
    f, out = (frame if frame is not None else sys._getframe(1)), []
    while f is not None and len(out) < limit:
        if _is_user(f.f_code.co_filename):
            out.append(f"{_short_path(f.f_code.co_filename)}:{f.f_lineno}")
        f = f.f_back
    return tuple(out)


def traceback_stack(exc: BaseException) -> tuple[str, ...]:
    """User frames of an exception's traceback, innermost first."""
    tb, out = exc.__traceback__, []
    while tb is not None:
        if _is_user(tb.tb_frame.f_code.co_filename):
            out.append(f"{_short_path(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}")
        tb = tb.tb_next
    return tuple(reversed(out))[:MAX_STACK]


def caller_location() -> str:
    """``file:LINE`` of the innermost user frame of the caller, or "<unknown>"."""
    stack = user_stack(sys._getframe(1), limit=1)
    return stack[0] if stack else "<unknown>"
