"""Where an op runs: its forward context and the stack of active nn.Modules (user frames: frames.py)."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook


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
