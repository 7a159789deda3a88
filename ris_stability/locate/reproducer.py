"""Standalone reproducers: the failing call's inputs as a .pt file plus a short torch-only script.

For a finding at torch function ``f`` (e.g. ``torch.linalg.eigh``) issued from ``file.py:LINE``, the step is
replayed once more under a small TorchFunctionMode that saves the inputs of the first such call from that
line and, through tensor hooks, the gradients that reach its outputs in backward. The script re-runs
``f`` on the saved inputs (and, for a backward finding, back-propagates the saved output gradients) and
prints how many entries came out non-finite: no model, no data, no ris-diag needed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode, resolve_name

from ris_stability.locate.finding import Finding
from ris_stability.observe.frames import user_stack
from ris_stability.records import UsageError

log = logging.getLogger(__name__)

SCRIPT = '''"""Reproducer exported by `risdiag bisect --export`: {cause}

Origin: phase {phase}, op {op}, node {node}, module {module}, line {location}.
Run: python {script}
"""
import pathlib

import torch

torch.set_num_threads({threads})  # the run's thread count: LAPACK rounding depends on it
data = torch.load(pathlib.Path(__file__).with_name("{data}"), weights_only=True)
fn = {function}
inputs = [t.clone().requires_grad_(t.is_floating_point() or t.is_complex()) if isinstance(t, torch.Tensor) else t
          for t in data["args"]]
out = fn(*inputs, **data["kwargs"])
outs = list(out) if isinstance(out, (tuple, list)) else [out]
floats = [o for o in outs if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())]
bad_fwd = sum(int((~torch.isfinite(o)).sum()) for o in floats)
nan_fwd = sum(int(torch.isnan(o).sum()) for o in floats)
print(f"forward: {{bad_fwd}} non-finite output entries ({{nan_fwd}} NaN)")
pairs = [(o, g) for o, g in zip(outs, data["grads"]) if g is not None]
if pairs:
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.grad is not None:
            bad, nan = int((~torch.isfinite(t.grad)).sum()), int(torch.isnan(t.grad).sum())
            print(f"backward: gradient of input {{i}} has {{bad}} non-finite entries ({{nan}} NaN) of {{t.grad.numel()}}")
'''


class _Capture(TorchFunctionMode):
    def __init__(self, function: str, location: str):
        super().__init__()
        self.function, self.location = function, location
        self.args: list[Any] | None = None
        self.kwargs: dict[str, Any] = {}
        self.grads: list[torch.Tensor | None] = []
        self._location_of: Callable[[], str] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.args is None and resolve_name(func) == self.function and self._here():
            self.args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            self.grads = [None] * len(outs)
            for i, o in enumerate(outs):
                if isinstance(o, torch.Tensor) and o.requires_grad:
                    o.register_hook(self._saver(i))
        return out

    def _saver(self, i: int) -> Callable[[torch.Tensor], None]:
        def save(grad: torch.Tensor | None) -> None:
            self.grads[i] = grad.detach().clone() if grad is not None else None
        return save

    def _here(self) -> bool:
        stack = user_stack()
        return not self.location or (bool(stack) and stack[0] == self.location)


def export_reproducer(finding: Finding, replayed: Any, out_dir: Path) -> list[Path]:
    """Write ``reproducer.pt`` and ``reproduce.py`` to ``out_dir``; returns their paths."""
    if not finding.function.startswith("torch."):
        raise UsageError(f"cannot export a reproducer for function {finding.function!r} (op {finding.op}): only "
                         "calls of public torch functions can be replayed standalone")
    cap = _Capture(finding.function, finding.location)
    replayed.model.zero_grad(set_to_none=True)
    with cap:
        loss = replayed.loss()
    loss.backward()
    if cap.args is None:
        raise UsageError(f"no call of {finding.function} from {finding.location} was seen on replay; cannot export")
    out_dir.mkdir(parents=True, exist_ok=True)
    data, script = out_dir / "reproducer.pt", out_dir / "reproduce.py"
    grads = cap.grads if finding.phase == "backward" else [None] * len(cap.grads)
    torch.save({"args": cap.args, "kwargs": cap.kwargs, "grads": grads}, data)
    script.write_text(SCRIPT.format(cause=finding.cause.replace('"', "'"), phase=finding.phase, op=finding.op,
                                    node=finding.node or "-", module=finding.module or "-", location=finding.location,
                                    script=script.name, data=data.name, function=finding.function,
                                    threads=torch.get_num_threads()))
    log.info("reproducer written to %s", out_dir)
    return [data, script]
