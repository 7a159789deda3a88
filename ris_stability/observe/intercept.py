"""Observe the linear-algebra entry points only: thin wrappers swapped in while a listener is active.

Routing every torch call through a Python ``TorchFunctionMode`` costs a round trip per call (thousands per
training step) to see the handful that are linear algebra. Instead, while at least one listener is
registered, each entry point of :data:`ENTRY_POINTS` (``torch.linalg.eigh``, ``torch.svd``,
``Tensor.cholesky``, ...) is replaced by a wrapper that calls the original and hands the call to the
listeners; the last listener to leave puts every original back. Calls made through the names looked up
at call time (``torch.linalg.eigh(...)``, ``x.cholesky()``) are seen; a reference taken before the
listener started (``from torch.linalg import eigh``) is not. Calls inside ``torch.compile``'d code, in
other threads, or nested inside an observed call (including the listeners' own statistics) pass through.

A function outside torch that declares ``__spectral_op__ = "eigh"`` (e.g. a custom eigh with its own
backward) is observed under its own name: the entry point it calls is attributed to it (found on the
Python stack), and its outputs are the ones whose gradient is watched.

The table is filled by the op registry (``ris_stability.linalg.registry``), which declares each
linear-algebra op once and hands its spellings to :func:`add_entry_point` (a kind names the statistics the
listener computes, see ``ris_stability.linalg.site_stats``).
"""
from __future__ import annotations

import functools
import logging
import sys
import threading
from dataclasses import dataclass, field
from types import CodeType, FrameType, MethodType
from typing import Any, Callable, Protocol

import torch

from ris_stability.observe import guard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EntryPoint:
    """An attribute ``owner.attr`` (a torch function or Tensor method) observed as op ``name`` of ``kind``."""

    owner: Any  # the namespace or class holding the attribute: torch, torch.linalg, torch.Tensor ...
    attr: str  # the attribute swapped while observed
    name: str  # the op name its records carry, e.g. "linalg.eigh"
    kind: str  # the registry kind that says how its call is measured
    # Cheap test of (args, kwargs): False passes the call straight through (e.g. Tensor.norm is observed only
    # for matrix orders; vector norms are frequent and have no spectral hazard).
    when: Callable[[tuple, dict], bool] | None = field(default=None, compare=False)

    @property
    def original(self) -> Callable:
        return _ORIGINALS.get(self, getattr(self.owner, self.attr))


# The observed entry points. Filled by the op registry (ris_stability.linalg.registry.register), where each
# linear-algebra op is declared once with all its spellings: this module only knows how to observe them.
ENTRY_POINTS: list[EntryPoint] = []


def add_entry_point(owner: Any, attr: str, name: str, kind: str,
                    when: Callable[[tuple, dict], bool] | None = None) -> EntryPoint:
    """Observe ``owner.attr`` as op ``name`` of statistics ``kind`` from the next time a listener starts
    (only the calls for which ``when(args, kwargs)`` holds, when given). Called by the op registry for
    each spelling of a registered op; register ops there, so that hazards and locator know them too."""
    entry = EntryPoint(owner, attr, name, kind, when)
    if entry not in ENTRY_POINTS:
        ENTRY_POINTS.append(entry)
    return entry


def entry_by_function() -> dict[Callable, EntryPoint]:
    """The original torch callables of the table (for TorchFunctionMode users such as the alignment)."""
    return {entry.original: entry for entry in ENTRY_POINTS}


class Listener(Protocol):
    thread: int

    def accepts(self) -> bool: ...

    def on_call(self, name: str, kind: str, args: tuple, kwargs: dict, out: Any,
                frame: FrameType | None) -> None: ...

    def before_backward(self) -> None: ...


# Backward starts here (Tensor.backward calls torch.autograd.backward): listeners get to hook the
# outputs of the forward, including those of autograd Functions, which require grad only once returned.
_BACKWARD_POINTS: list[tuple[Any, str]] = [(torch.autograd, "backward"), (torch.autograd, "grad")]


class _State(threading.local):
    depth = 0  # > 0 inside an observed call or a listener: nested entry points pass through


_STATE = _State()
_LISTENERS: list[Listener] = []
_PARTS: dict[type, str] = {}  # listener class -> its guard part name (asked at every call)
_ORIGINALS: dict[EntryPoint, Callable] = {}  # entry -> original, while installed
_INSTALLED: dict[EntryPoint, tuple[bool, Callable]] = {}  # entry -> (owned the attribute, wrapper)
_LOCK = threading.Lock()


class _Quiet:
    """``with quiet():`` entry points called inside pass through unobserved (a class, not a generator: it is
    entered at every observed call)."""

    def __enter__(self) -> None:
        _STATE.depth += 1

    def __exit__(self, *exc: Any) -> None:
        _STATE.depth -= 1


_QUIET = _Quiet()


def quiet() -> _Quiet:
    """Entry points called inside pass through unobserved (for the listeners' own statistics)."""
    return _QUIET


_MARKS: dict[CodeType, tuple[str, str] | None] = {}  # code -> (name, kind) of its marked function, or None
_MAX_MARKS = 4096  # code objects remembered (a program that makes functions at run time stops adding)


def _mark_of(frame: FrameType) -> tuple[str, str] | None:
    """(name, kind) when ``frame`` runs a function marked ``__spectral_op__``; cached per code object (a
    decorator marks a function when it is defined, so a code object's answer does not change)."""
    code = frame.f_code
    try:
        return _MARKS[code]
    except KeyError:
        pass
    func = frame.f_globals.get(code.co_name)
    kind = getattr(func, "__spectral_op__", None)
    mark = (code.co_name, kind) if kind is not None and getattr(func, "__code__", None) is code else None
    if len(_MARKS) < _MAX_MARKS:
        _MARKS[code] = mark
    return mark


def _marked_caller(frame: FrameType | None, limit: int = 8) -> tuple[str, str, FrameType] | None:
    """(name, kind, frame) of the innermost function marked ``__spectral_op__`` on the stack above."""
    for _ in range(limit):
        if frame is None:
            return None
        mark = _mark_of(frame)
        if mark is not None:
            return mark[0], mark[1], frame
        frame = frame.f_back
    return None


class StandIn:
    """What sits in place of a torch function while observed: it calls ``call`` and compares (and
    hashes) equal to the original, so code that checks ``func in (torch.linalg.eig, ...)`` or looks
    functions up in tables built meanwhile (torch.overrides caches them) still finds the original; set on
    ``torch.Tensor`` it binds like a method."""

    def __init__(self, call: Callable, original: Callable):
        functools.update_wrapper(self, original)
        self._call, self._original = call, original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else MethodType(self, obj)

    def __eq__(self, other: object) -> bool:
        return other is self or other is self._original or (
            isinstance(other, StandIn) and other._original is self._original)

    def __hash__(self) -> int:
        return hash(self._original)

    def __repr__(self) -> str:
        return f"<observed {self._original!r}>"


def original_of(func: Any) -> Any:
    """The torch function behind a stand-in (``func`` itself otherwise)."""
    return func._original if isinstance(func, StandIn) else func


def _wrap(entry: EntryPoint, original: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        state = _STATE
        if state.depth or not _LISTENERS or torch.compiler.is_compiling():
            return original(*args, **kwargs)
        ident = threading.get_ident()  # the cheaper refusal first: no listener samples this call (most steps)
        listeners = [lst for lst in _LISTENERS if lst.thread == ident and _accepts(lst)]
        if not listeners or (entry.when is not None and not entry.when(args, kwargs)):
            return original(*args, **kwargs)
        frame = sys._getframe(2)  # the caller of StandIn.__call__
        name, kind = entry.name, entry.kind
        marked = _marked_caller(frame)
        if marked is not None:  # the call site is where the marked function was called
            name, kind, frame = marked[0], marked[1], marked[2].f_back
        state.depth += 1
        try:
            out = original(*args, **kwargs)
        except Exception:
            # The input that made the op fail (e.g. an indefinite matrix in cholesky) is the finding.
            _notify(listeners, name, kind, args, kwargs, None, frame)
            raise
        finally:
            state.depth -= 1
        _notify(listeners, name, kind, args, kwargs, out, frame)
        return out

    return StandIn(wrapper, original)


def _wrap_backward(original: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _LISTENERS and not _STATE.depth and not torch.compiler.is_compiling():
            ident = threading.get_ident()
            with quiet():
                for listener in [lst for lst in _LISTENERS if lst.thread == ident]:
                    guard.call(_part(listener), listener.before_backward)
        return original(*args, **kwargs)

    return StandIn(wrapper, original)


def _notify(listeners: list[Listener], name: str, kind: str, args: tuple, kwargs: dict, out: Any,
            frame: FrameType) -> None:
    with quiet():
        for listener in listeners:
            guard.call(_part(listener), listener.on_call, name, kind, args, kwargs, out, frame)


def _part(listener: Listener) -> str:
    """The guard's name for a listener's work (one failure switches that listener off for the run)."""
    kind = type(listener)
    part = _PARTS.get(kind)
    if part is None:
        part = _PARTS[kind] = f"intercept:{kind.__name__}"
    return part


def _accepts(listener: Listener) -> bool:
    return bool(guard.call(_part(listener), listener.accepts, default=False))


def register(listener: Listener) -> None:
    """Start handing entry-point calls to ``listener`` (installs the wrappers for the first one)."""
    with _LOCK:
        if any(lst is listener for lst in _LISTENERS):
            return
        _LISTENERS.append(listener)
        if len(_LISTENERS) == 1:
            _install()


def unregister(listener: Listener) -> None:
    """Stop handing calls to ``listener``; the last one to leave restores every original."""
    with _LOCK:
        _LISTENERS[:] = [lst for lst in _LISTENERS if lst is not listener]
        if not _LISTENERS:
            _uninstall()


def _install() -> None:
    backward = [EntryPoint(owner, attr, attr, "") for owner, attr in _BACKWARD_POINTS]
    for entry in ENTRY_POINTS + backward:
        if entry in _INSTALLED:
            continue
        original = getattr(entry.owner, entry.attr)
        wrapper = _wrap(entry, original) if entry.kind else _wrap_backward(original)
        owned = entry.attr in vars(entry.owner)  # a Tensor method may live on the C base class
        _ORIGINALS[entry] = original
        _INSTALLED[entry] = (owned, wrapper)
        setattr(entry.owner, entry.attr, wrapper)


def _uninstall() -> None:
    for entry, (owned, wrapper) in list(_INSTALLED.items()):
        if getattr(entry.owner, entry.attr, None) is wrapper:
            if owned:
                setattr(entry.owner, entry.attr, _ORIGINALS[entry])
            else:
                delattr(entry.owner, entry.attr)
        else:
            # Someone swapped the attribute after us (e.g. a context that patches eigh) and will put our
            # wrapper back when it leaves: it then passes every call straight through.
            log.debug("intercept: %s.%s was replaced while observed; left to its replacer",
                      getattr(entry.owner, "__name__", entry.owner), entry.attr)
        del _INSTALLED[entry]
        del _ORIGINALS[entry]


def installed() -> bool:
    """Whether the wrappers are in place (some listener is active)."""
    return bool(_INSTALLED)
