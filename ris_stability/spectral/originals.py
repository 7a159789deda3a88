"""The torch functions the gap-aware decompositions call in their forward, and which ones the
``gap_aware()`` context replaces.

While the context is active, ``torch.linalg.eigh`` is our function; its forward must not call itself.
It calls whatever was installed when the context was entered (torch's own function, or an observer
that patched it before us), so the forward stays torch's, bit for bit, and outer observers still see
the call.
"""
from __future__ import annotations

from typing import Callable

import torch

# (owner, attribute) of every spelling the context swaps, keyed by a short name.
SPELLINGS: dict[str, tuple[object, str]] = {
    "linalg.eigh": (torch.linalg, "eigh"),
    "linalg.svd": (torch.linalg, "svd"),
    "svd": (torch, "svd"),
    "Tensor.svd": (torch.Tensor, "svd"),
}

# Functions saved on entry of the outermost gap_aware() context (empty while none is active).
saved: dict[str, Callable] = {}


def original(name: str) -> Callable:
    """The function to run as the forward of spelling ``name``: the one saved on entry, else the current."""
    fn = saved.get(name)
    if fn is not None:
        return fn
    owner, attr = SPELLINGS[name]
    return getattr(owner, attr)
