"""The training stack around a model, as the monitor sees it from outside: compiled parts, optimizers,
GradScaler, and the run's metadata (torch version, device, dtype, command).

torch.compile: ``torch.compile(model)`` returns an ``OptimizedModule`` wrapping the model as
``_orig_mod``; ``model.compile()`` compiles the module's call in place. The monitor unwraps the first
(parameter names stay the user's) and attaches no module hook Dynamo could trace, so a compiled model
trains as without it. What it cannot see is stated once: linear-algebra calls inside compiled regions
run as fused graph code, so their spectral statistics are missing; non-finite checks, gradient norms,
capsules and skip decisions work as usual (they read tensors after backward).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import torch
from torch import nn

COMPILE_LIMITATION = ("linear-algebra statistics are not observed inside compiled regions (their calls run as "
                      "graph code); non-finite checks, gradient norms, capsules and skip decisions are unaffected")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind ``torch.compile`` and DistributedDataParallel wrappers (itself when not
    wrapped): a wrapper would prefix every name with _orig_mod / module."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            break
    return model


def compiled_parts(model: nn.Module) -> list[str]:
    """Dotted names of the compiled modules ("" for the root): torch.compile wrappers and model.compile()."""
    roots = (model, getattr(model, "module", None))  # DDP(compile(m)) as well as compile(m)
    parts = [""] if any(isinstance(getattr(m, "_orig_mod", None), nn.Module) for m in roots if m is not None) else []
    for name, module in unwrap(model).named_modules():
        if getattr(module, "_compiled_call_impl", None) is not None or (name and unwrap(module) is not module):
            parts.append(name)
    return list(dict.fromkeys(parts))


def optimizers_of(ctx: Any) -> list[Any]:
    """The optimizers a loop context names: ``ctx.optimizers`` or ``ctx.optimizer`` (one or a sequence)."""
    found = getattr(ctx, "optimizers", None) or getattr(ctx, "optimizer", None)
    if found is None:
        return []
    return list(found) if isinstance(found, (list, tuple)) else [found]


def portable(path: str, root: str | None = None) -> str:
    """A path relative to ``root`` (default: the working directory) when inside it, else its file name,
    so no absolute path reaches a run folder."""
    if not os.path.isabs(path):
        return path
    rel = os.path.relpath(path, root or os.getcwd())
    return os.path.basename(path) if rel.startswith("..") else rel


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process, with paths made portable."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        argv = ["python", *argv]
    return " ".join(portable(a) if os.sep in a else a for a in argv)


def run_meta(model: nn.Module, command: str | None = None) -> dict[str, Any]:
    """torch version, device, dtype, thread count and command of a run (meta.json of its folder)."""
    first = next(unwrap(model).parameters(), None)
    return {"torch": str(torch.__version__), "device": str(first.device) if first is not None else "cpu",
            "dtype": str(first.dtype).replace("torch.", "") if first is not None else "float32",
            "threads": torch.get_num_threads(),
            "command": command if command is not None else command_line()}
