"""Which matrices enter linear algebra and consumer modules while a path runs: :class:`MatrixCapture`.

A TorchFunctionMode (removed on exit) sees every torch call; a call of an allow-listed linear-algebra op
(``probe.OPS``, or a function marked ``__spectral_op__``) records its input matrix, and a named *consumer*
module records every square matrix it reads without having produced it. Modules are named by
ris_stability.observe.tracker. The comparison of what was captured is in ``alignment``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ris_stability.instruments.probe import OPS, caller_location
from ris_stability.observe.tracker import ModuleTracker


@dataclass
class Captured:
    """One matrix that entered linear algebra or a consumer module, and who consumed it."""

    consumer: str  # consumer name, or the module path / source line of a linalg call
    via: str  # the op that read it first (e.g. "linalg.eigh", "__sub__")
    location: str  # file:line of that op
    tensor: Tensor = field(repr=False)  # the object itself (identity matters), not a copy


def is_square_matrix(t: Any) -> bool:
    return (isinstance(t, Tensor) and t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 2
            and (t.is_floating_point() or t.is_complex()))


def _children(obj: Any) -> list[Any]:
    """What a container holds: the batch of a training step may be a dataclass of tensors, not only
    lists, tuples and dicts, and its data matrices must be recognised wherever they sit."""
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return []


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """Tensors inside (nested) lists, tuples, dicts and dataclass instances, in order."""
    if isinstance(obj, Tensor):
        yield obj
        return
    for child in _children(obj):
        yield from tensors_in(child)


def _is_linalg(func: Any) -> bool:
    """An allow-listed torch op, or a function marked ``__spectral_op__`` (probes' convention for custom
    linear algebra such as an eigh with its own backward)."""
    return func in OPS or getattr(func, "__spectral_op__", None) is not None


def _op_name(func: Any) -> str:
    entry = OPS.get(func)
    return entry[0] if entry is not None else getattr(func, "__name__", repr(func))


class _Mode(TorchFunctionMode):
    def __init__(self, capture: MatrixCapture):
        super().__init__()
        self._capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        self._capture._before(func, args, kwargs)
        out = func(*args, **kwargs)
        self._capture._after(out)
        return out


class MatrixCapture:
    """Records the matrices entering linalg calls and consumer modules while active (a context manager).

    ``roots`` name modules for the consumer labels of linalg calls (``{"loss": loss_fn}`` labels an eigh
    inside ``loss_fn.subspace`` as ``loss.subspace``); ``consumers`` maps a label to a module whose square
    matrix inputs (all torch calls, not only linalg) are recorded under that label.
    """

    def __init__(self, roots: Mapping[str, nn.Module] | None = None,
                 consumers: Mapping[str, nn.Module] | None = None):
        self.records: list[Captured] = []
        self._roots = dict(roots or {})
        self._consumers = {id(module): name for name, module in (consumers or {}).items()}
        self._tracker = ModuleTracker(self._roots)
        self._produced: dict[str, set[int]] = {}  # per consumer: ids of the tensors it made ...
        self._alive: list[Tensor] = []  # ... kept alive while capturing, so an id cannot be reused
        self._seen: set[tuple[str, int]] = set()
        self._mode: _Mode | None = None

    def __enter__(self) -> MatrixCapture:
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
        finally:
            self._mode = None
            self._produced, self._alive = {}, []

    def _consumer(self, running: list[nn.Module]) -> str | None:
        return next((self._consumers[id(m)] for m in running if id(m) in self._consumers), None)

    def _add(self, consumer: str, via: str, tensor: Tensor) -> None:
        key = (consumer, id(tensor))
        if key not in self._seen:
            self._seen.add(key)
            self.records.append(Captured(consumer, via, caller_location(), tensor))

    def _before(self, func: Any, args: tuple, kwargs: dict) -> None:
        running = ModuleTracker.running()
        consumer = self._consumer(running)
        if _is_linalg(func):
            matrix = args[0] if args else kwargs.get("A", kwargs.get("input"))
            if isinstance(matrix, Tensor) and matrix.dim() >= 2:
                label = consumer or self._tracker.name(running) or caller_location()
                self._add(label, _op_name(func), matrix)
        if consumer is not None:
            made = self._produced.get(consumer, set())
            for t in tensors_in((args, kwargs)):
                if is_square_matrix(t) and id(t) not in made:
                    self._add(consumer, _op_name(func), t)

    def _after(self, out: Any) -> None:
        consumer = self._consumer(ModuleTracker.running())
        if consumer is not None:
            outputs = list(tensors_in(out))
            self._alive.extend(outputs)
            self._produced.setdefault(consumer, set()).update(id(t) for t in outputs)


__all__ = ["Captured", "MatrixCapture", "is_square_matrix", "tensors_in"]
