"""The user's source lines: "file.py:LINE" of the frames outside torch and outside ris_stability.

The toolkit's own instruments (modes, hooks) sit between the user's call and the op, so both torch's
and this package's frames are skipped; paths are shown relative to the working directory when inside it.
"""
from __future__ import annotations

import os
import sys
from types import FrameType

import torch

_SKIP_DIRS = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
              os.path.dirname(os.path.abspath(__file__)) + os.sep)
MAX_STACK = 8  # user frames kept per op: enough to reach the model code from a helper


def _is_user(filename: str) -> bool:
    # frozen stdlib modules (runpy, which runs a traced script) are never the user's code
    return not filename.startswith("<frozen ") and not os.path.abspath(filename).startswith(_SKIP_DIRS)


def _short_path(filename: str) -> str:
    rel = os.path.relpath(filename)
    return filename if rel.startswith("..") else rel


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
