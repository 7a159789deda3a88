"""The one guard every hook, mode and callback of the toolkit runs behind: an instrument never ends the run.

An exception raised inside a guarded *part* (e.g. ``"probe.backward_hooks"``, ``"driver"``) is caught and
recorded once (an ``instrument_error`` event of the run, its traceback in a file of the run folder, never
on the user's terminal), the part is switched off for the rest of the run, and the guarded call returns its
neutral value (``None`` for a hook: the gradient, the output and the step go on exactly as without the
toolkit). The user's own errors are not ours to catch: a guarded part never wraps the user's code, only our
work around it. Control-flow exceptions the toolkit raises on purpose (the ``stop`` policy's
NonFiniteError) carry ``passes_guard = True`` and pass through, and so does anything that is not an
``Exception`` (KeyboardInterrupt, SystemExit).

State is process-wide because hooks are: the run that owns the process binds a recorder (:func:`bind`) and
unbinds it at its end; an error with no run bound is kept in memory and logged at debug level.
"""
from __future__ import annotations

import functools
import logging
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from contextlib import contextmanager

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
# (kind, severity, message, **fields): the run's event writer
EventFn = Callable[..., None]


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.off: set[str] = set()
        self.errors: list[dict[str, Any]] = []
        self.run_dir: Path | None = None
        self.event: EventFn | None = None


_S = _State()


def passes(exc: BaseException) -> bool:
    """Whether ``exc`` must reach the caller: not an Exception, or raised on purpose by the toolkit."""
    return not isinstance(exc, Exception) or bool(getattr(exc, "passes_guard", False))


def is_off(part: str) -> bool:
    return part in _S.off


def bind(run_dir: str | Path, event: EventFn) -> None:
    """A run starts: its errors go to ``run_dir`` and ``event``; every part is on again."""
    with _S.lock:
        _S.run_dir, _S.event = Path(run_dir), event
        _S.off.clear()
        _S.errors = []


def unbind() -> list[dict[str, Any]]:
    """The run ends: returns what was recorded (for its summary); parts are on again for the next run."""
    with _S.lock:
        errors, _S.errors = _S.errors, []
        _S.run_dir, _S.event = None, None
        _S.off.clear()
    return errors


def errors() -> list[dict[str, Any]]:
    """The instrument errors recorded since the run was bound (part, error, traceback file)."""
    return list(_S.errors)


def record(part: str, exc: BaseException) -> None:
    """Note that ``part`` failed with ``exc`` and switch it off (only the first error of a part is kept)."""
    with _S.lock:
        if part in _S.off:
            return
        _S.off.add(part)
        run_dir, event = _S.run_dir, _S.event
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    entry: dict[str, Any] = {"part": part, "error": f"{type(exc).__name__}: {exc}"[:500], "traceback": None}
    if run_dir is not None:
        try:
            folder = run_dir / "instrument_errors"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{part.replace('/', '_')}.txt"
            path.write_text(text)
            entry["traceback"] = str(path.relative_to(run_dir))
        except OSError as err:  # a full disk must not turn one lost instrument into a lost run
            log.debug("instrument error traceback of %s not written: %s", part, err)
    _S.errors.append(entry)
    log.debug("instrument part %s switched off after %s", part, entry["error"], exc_info=exc)
    if event is not None:
        try:
            event("instrument_error", "warning",
                  f"instrument part {part!r} failed ({entry['error']}) and is switched off for the rest of the "
                  f"run; training continued unchanged. Traceback: {entry['traceback'] or 'not written'}; "
                  "please report it with that file", **entry)
        except Exception as err:  # the event writer itself failed (e.g. closed): the entry stays in memory
            log.debug("instrument_error event of %s not written: %s", part, err)


def guarded(part: str, default: Any = None) -> Callable[[F], F]:
    """Decorator: run the function as guarded ``part``; once the part is off, return ``default`` at once."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            return call(part, fn, *args, default=default, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


def call(part: str, fn: Callable[..., Any], *args: Any, default: Any = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` as guarded ``part`` (for callables made at run time, e.g. listeners)."""
    if part in _S.off:
        return default
    try:
        return fn(*args, **kwargs)
    except BaseException as exc:
        if passes(exc):
            raise
        record(part, exc)
        return default


def users_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the user's own function that a toolkit wrapper forwards to (the original ``GradScaler.step``,
    ``torch.autograd.backward``, ``zero_grad``), unguarded: its errors are the user's. Routing every forwarded call
    through this one frame marks what happens inside as the user's work, e.g. for tests that count the host reads
    the toolkit makes (a GradScaler's own finite check is not one of them)."""
    return fn(*args, **kwargs)


@contextmanager
def guard(part: str) -> Iterator[bool]:
    """``with guard(part) as on:`` a block of instrument work (skipped by the caller when ``on`` is False);
    an error inside ends the block, is recorded and switches the part off."""
    if part in _S.off:
        yield False
        return
    try:
        yield True
    except BaseException as exc:
        if passes(exc):
            raise
        record(part, exc)


__all__ = ["bind", "call", "errors", "guard", "guarded", "is_off", "passes", "record", "unbind", "users_call"]
