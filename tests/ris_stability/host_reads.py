"""Count the host reads ris_stability makes, per step, on CPU.

A host read is any call that brings a tensor's value to Python: ``.item()``, ``float(t)``, ``int(t)``,
``bool(t)`` (an ``if tensor:``), ``t.__index__``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``format(t)``. On
CUDA each one waits for the device (a sync); on CPU they are free, but they can be counted here, which makes
the count the contract a test can hold on any machine. So do the aten ops that make a GPU wait without handing a
value to Python (``nonzero``, a boolean-mask selection, ``unique``, ...: their output's size depends on the values),
counted as reads, and, apart (``copies``), Python data made into a tensor (``torch.tensor(list)``, a list used as an
index), a host-to-device copy on a GPU.

A read counts when the first frame outside torch's own package that led to it is a ris_stability file: a read
torch makes on behalf of ris_stability (e.g. inside a torch function it called) counts, a read of the user's
own script or test does not. Each read is attributed to the step the monitor is in (``StabilityMonitor``'s
step start marks the boundary), "setup" before the first step, and "finish" once the run is closing. What
runs inside ``guard.users_call`` (the user's own call, forwarded by a toolkit wrapper: e.g. a GradScaler's own
finite check inside ``scaler.step``) is the user's.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ris_stability
from ris_stability.monitor.stability_monitor import StabilityMonitor
from ris_stability.observe.guard import users_call

PACKAGE = os.path.dirname(os.path.abspath(ris_stability.__file__)) + os.sep
TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
THIS = os.path.abspath(__file__)
FORWARDED = users_call.__code__  # a wrapper forwarding the user's own call: what happens inside is the user's
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")
# aten ops that make a GPU wait although no value reaches Python (their output's size depends on the values):
# counted as reads. ``lift_fresh``: Python data turned into a tensor (a list used as an index, say), a
# host-to-device copy on a GPU (``torch.tensor(list, device=...)`` dispatches it too); counted apart.
SYNC_OPS = frozenset({"aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default",
                      "aten.unique_dim.default", "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor",
                      "aten.multinomial.default"})
COPY_OPS = frozenset({"aten.lift_fresh.default", "aten.lift_fresh_copy.default"})


@dataclass
class HostReads:
    """Reads per step (``by_step[step]`` and ``where[step]``: the ris_stability lines that read)."""
    by_step: collections.Counter = field(default_factory=collections.Counter)
    where: dict = field(default_factory=lambda: collections.defaultdict(list))
    copies: collections.Counter = field(default_factory=collections.Counter)  # Python data made into tensors
    copy_where: dict = field(default_factory=lambda: collections.defaultdict(list))
    phase: object = "setup"

    def steps(self, steps) -> list[int]:
        return [self.by_step[s] for s in steps]

    def report(self, steps) -> str:
        return "; ".join(f"step {s}: {self.by_step[s]} ({', '.join(self.where[s])})" for s in steps
                         if self.by_step[s])


def _reader() -> str | None:
    """``file:line`` of the ris_stability frame that caused the read, or None when user code did."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is FORWARDED:
            return None
        name = os.path.abspath(frame.f_code.co_filename)
        if name == THIS:
            frame = frame.f_back
            continue
        if name.startswith(TORCH):  # torch's own frames, the dispatch mode's included
            frame = frame.f_back
            continue
        if name.startswith(PACKAGE):
            return f"{name[len(PACKAGE):]}:{frame.f_lineno}"
        return None
    return None


@contextlib.contextmanager
def counting() -> Iterator[HostReads]:
    """Patch the reading methods of torch.Tensor and the monitor's step boundaries while the block runs."""
    counts = HostReads()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def patched(name, real):
        def read(self, *args, **kwargs):
            where = _reader()
            if where is not None:
                counts.by_step[counts.phase] += 1
                counts.where[counts.phase].append(f"{name}@{where}")
            return real(self, *args, **kwargs)
        return read

    starts, ends = StabilityMonitor.on_step_start, StabilityMonitor.detach

    def on_step_start(self, ctx):
        counts.phase = ctx.step
        return starts(self, ctx)

    def detach(self, *args, **kwargs):
        counts.phase = "finish"
        return ends(self, *args, **kwargs)

    class HiddenSyncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = str(func)
            tally = (counts.by_step, counts.where) if op in SYNC_OPS else \
                (counts.copies, counts.copy_where) if op in COPY_OPS else None
            where = _reader() if tally is not None else None
            if where is not None:
                tally[0][counts.phase] += 1
                tally[1][counts.phase].append(f"{op}@{where}")
            return func(*args, **(kwargs or {}))

    for name, real in originals.items():
        setattr(torch.Tensor, name, patched(name, real))
    StabilityMonitor.on_step_start, StabilityMonitor.detach = on_step_start, detach
    try:
        with HiddenSyncs():
            yield counts
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)
        StabilityMonitor.on_step_start, StabilityMonitor.detach = starts, ends
