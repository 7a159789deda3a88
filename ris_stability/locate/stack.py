"""Where an op runs: its forward context (modules: ris_stability.observe.tracker; user frames: frames.py)."""
from __future__ import annotations

import dataclasses

from torch import Tensor


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
