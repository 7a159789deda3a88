"""Where an op runs: the user's frames ("file.py:LINE") and the stack of active nn.Modules.

Frames inside torch and inside ris_stability are skipped (the toolkit's own instruments may sit
between the user's call and the op).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

_SKIP_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


@dataclasses.dataclass
class _Context:
    """Forward context of an op or of the autograd node it created."""

    module: str = ""
    stack: tuple[str, ...] = ()  # user frames "file.py:LINE", innermost first
    function: str = ""
    op: str = ""
    spectrum: tuple[str, Tensor] | None = None  # ("eigh"|"svd", values) of the forward decomposition

    @property
    def location(self) -> str:
        return self.stack[0] if self.stack else ""



def _short_path(filename: str) -> str:
    rel = os.path.relpath(filename)
    return filename if rel.startswith("..") else rel


MAX_STACK = 8  # user frames kept per op: enough to reach the model code from a helper


def _is_user(filename: str) -> bool:
    return not filename.startswith(_SKIP_DIRS)


def user_stack(frame=None) -> tuple[str, ...]:
    """'file.py:LINE' of the frames outside torch and ris_stability, innermost first (the toolkit's
    own instruments may sit between the user's call and the op)."""
    f, out = (frame if frame is not None else sys._getframe(1)), []
    while f is not None and len(out) < MAX_STACK:
        if _is_user(f.f_code.co_filename):
            out.append(f"{_short_path(f.f_code.co_filename)}:{f.f_lineno}")
        f = f.f_back
    return tuple(out)


def _traceback_stack(exc: BaseException) -> tuple[str, ...]:
    tb, out = exc.__traceback__, []
    while tb is not None:
        if _is_user(tb.tb_frame.f_code.co_filename):
            out.append(f"{_short_path(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}")
        tb = tb.tb_next
    return tuple(reversed(out))[:MAX_STACK]


# --- module tracking -------------------------------------------------------------------------------
class _ModuleStack:
    """Stack of active modules from global forward hooks; names relative to the roots."""

    def __init__(self, roots: Mapping[str, nn.Module]):
        self._names: dict[int, tuple[nn.Module, str]] = {}
        for root_name, root in roots.items():
            for sub, m in root.named_modules():
                path = ".".join(p for p in (root_name, sub) if p)
                self._names.setdefault(id(m), (m, path))
        self.stack: list[nn.Module] = []
        self._handles: list = []

    def install(self) -> None:
        self._handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def name_of(self, m: nn.Module) -> str:
        return self._names[id(m)][1] if id(m) in self._names else type(m).__name__

    def _pre(self, module: nn.Module, args) -> None:
        if id(module) not in self._names:
            self._names[id(module)] = (module, self._unknown_name(module))
        self.stack.append(module)

    def _post(self, module: nn.Module, args, output) -> None:
        # Pop down to this module: entries left by an exception that was caught inside go too.
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is module:
                del self.stack[i:]
                return

    def _unknown_name(self, module: nn.Module) -> str:
        if not self.stack:
            return type(module).__name__
        parent = self.stack[-1]
        base = self.name_of(parent)
        rel = next((n for n, m in parent.named_modules() if m is module and n), type(module).__name__)
        return ".".join(p for p in (base, rel) if p)

    def current(self) -> str:
        return self.name_of(self.stack[-1]) if self.stack else ""
