"""Which nn.Module is running: THE module tracker of the probe, the alignment capture and the locator.

The modules being called are read from the Python stack when asked (the frames of ``Module._call_impl``,
whose ``self`` is the module), not kept up to date by global forward hooks: a hook pair would put every
module call of the model on torch's slow call path for the whole run, while the instruments need the
module only at the few calls they record. Reading the stack also cannot drift: a module whose forward
raised is gone from the stack by construction (the hook-based stacks needed ``always_call=True``), and
an exception's traceback still holds the modules that were running where it was raised.

Naming rule (one for every instrument): a module reachable from a root is named by its dotted path under
that root (``{"model": m}`` names ``m.encoder.layers[0]`` "model.encoder.layers.0"; the first root that
reaches a module wins). Any other module is named after the nearest running module that has a name, as
that name plus its own path inside it (or its class name, when it is not a submodule of it); the
outermost running module, if it has no name, is named by its class.
"""
from __future__ import annotations

import sys
import weakref
from types import FrameType, TracebackType
from typing import Iterable, Iterator, Mapping

from torch import nn

# Module.__call__ -> _wrapped_call_impl -> _call_impl(self, ...): one frame per running module call.
_CALL_CODES = frozenset({nn.Module._call_impl.__code__})


def _frames_from(frame: FrameType | None) -> Iterator[FrameType]:
    while frame is not None:
        yield frame
        frame = frame.f_back


def traceback_frames(tb: TracebackType | None) -> list[FrameType]:
    """Frames of a traceback, innermost first (where the exception was raised comes first)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]


def running_modules(frames: Iterable[FrameType]) -> list[nn.Module]:
    """The modules whose call is running in ``frames`` (innermost first), innermost first."""
    out: list[nn.Module] = []
    for frame in frames:
        if frame.f_code in _CALL_CODES:
            module = frame.f_locals.get("self")
            if isinstance(module, nn.Module) and not (out and out[-1] is module):
                out.append(module)
    return out


class ModuleTracker:
    """Names the running module by the rule of the module docstring, relative to ``roots``."""

    def __init__(self, roots: Mapping[str, nn.Module] | None = None):
        self.roots = dict(roots or {})
        self._names: dict[int, str] = {}  # ids stay valid: the roots keep their submodules alive
        for root, top in self.roots.items():
            for sub, module in top.named_modules():
                self._names.setdefault(id(module), f"{root}.{sub}".strip("."))
        # Derived names, weakly held: a module built inside a forward must not be kept alive by us.
        self._derived: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def same_roots(self, roots: Mapping[str, nn.Module] | None) -> bool:
        roots = dict(roots or {})
        return roots.keys() == self.roots.keys() and all(roots[k] is self.roots[k] for k in roots)

    def name(self, stack: list[nn.Module]) -> str:
        """Name of ``stack[0]`` given the running modules ``stack`` (innermost first); "" when empty."""
        if not stack:
            return ""
        inner = stack[0]
        known = self._names.get(id(inner))
        if known is not None:
            return known
        for depth, outer in enumerate(stack[1:], start=1):
            base = self._names.get(id(outer))
            if base is not None or depth == len(stack) - 1:
                base = type(outer).__name__ if base is None else base
                return f"{base}.{self._relative_name(outer, inner)}"
        return type(inner).__name__

    @staticmethod
    def running(frame: FrameType | None = None) -> list[nn.Module]:
        """The modules running at ``frame`` (default: the caller's), innermost first."""
        return running_modules(_frames_from(frame if frame is not None else sys._getframe(1)))

    def current(self, frame: FrameType | None = None) -> str:
        """Name of the innermost module running at ``frame`` (default: the caller's); "" outside modules."""
        frame = frame if frame is not None else sys._getframe(1)
        while frame is not None:  # the innermost module call; a module with a name ends the walk there
            if frame.f_code in _CALL_CODES:
                module = frame.f_locals.get("self")
                if isinstance(module, nn.Module):
                    known = self._names.get(id(module))
                    return known if known is not None else self.name(running_modules(_frames_from(frame)))
            frame = frame.f_back
        return ""

    def of_traceback(self, tb: TracebackType | None) -> str:
        """Name of the innermost module that was running where an exception with this traceback was raised."""
        return self.name(running_modules(traceback_frames(tb)))

    def _relative_name(self, outer: nn.Module, inner: nn.Module) -> str:
        """Path of ``inner`` inside ``outer``, or its class name when it is not one of outer's submodules."""
        cached = self._derived.get(inner)
        if cached is not None and cached[0]() is outer:
            return cached[1]
        name = next((name for name, module in outer.named_modules() if module is inner and name),
                    type(inner).__name__)
        self._derived[inner] = (weakref.ref(outer), name)
        return name
