"""ReadBack: the monitor's device values brought to the host in ONE transfer.

Every ``.item()``, ``float(t)``, ``bool(t)`` or ``.tolist()`` of a tensor is a host read, and on a GPU each one
waits for the device (a sync). The monitor therefore never reads a value where it computes it: it queues the
tensor here with the function that uses the numbers, and a read point (the step's skip decision, a sampled
step, the end of the run) takes everything queued so far in one ``torch.cat(...).tolist()``. The functions run
in the order their values were queued, so the trace keeps its order (rows by step).

Values travel as float64: flags and counts (up to 2**53) are exact, float32 statistics are widened exactly.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from ris_stability.observe.critical import critical

log = logging.getLogger(__name__)

Use = Callable[[list[float]], None]
_EXACT = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # read alone as Python floats, exactly


class ReadBack:
    """Device tensors waiting for one host read, each with the function that takes its numbers."""

    def __init__(self) -> None:
        self._parts: list[tuple[Tensor | None, Use]] = []
        self.reads = 0  # host reads made (one per read() with anything queued)

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, tensor: Tensor | None, use: Use) -> None:
        """Queue ``tensor`` (any shape, flattened; None: no values, ``use([])`` runs in order with the rest)."""
        if tensor is not None and (tensor.requires_grad or tensor.dim() != 1):  # a flat vector as it is: no kernel
            tensor = tensor.detach().reshape(-1)
        self._parts.append((tensor, use))

    def read(self) -> None:
        """One host read of everything queued, then each part's function with its numbers. A function may
        queue more (read at the next read point)."""
        with critical():  # a termination signal waits until every taken part has run (observe/critical.py)
            parts, self._parts = self._parts, []
            tensors = [t for t, _ in parts if t is not None and t.numel()]
            values: list[float] = []
            if tensors:
                if len(tensors) == 1 and tensors[0].dtype in _EXACT:  # a lone verdict: .tolist() widens it exactly
                    flat = tensors[0]
                else:
                    device = tensors[0].device
                    flat = torch.cat([t.to(device=device, dtype=torch.float64) for t in tensors])
                values = flat.tolist()  # the one host read
                self.reads += 1
            at = 0
            for tensor, use in parts:
                n = 0 if tensor is None else tensor.numel()
                use(values[at:at + n])
                at += n


__all__ = ["ReadBack"]
