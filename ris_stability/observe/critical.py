"""Critical sections: a termination signal that arrives while the toolkit completes a step's records (the
read point that writes its rows and counts its steps) takes effect at the end of that work, never in the
middle of it, so a flushed run cannot hold a row that its summary does not count, or lose the rows that were
taken off the queue but not yet written.

The signal handler (``ris_stability.attach.signals``) asks :func:`defer` first; inside a section the action
it would have taken (raising ``Terminated``) is kept and run when the outermost section on the main thread
ends. Sections are counted per thread: only the main thread receives signals.
"""
from __future__ import annotations

import threading
from typing import Any, Callable


class _Local(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.pending: Callable[[], None] | None = None


_S = _Local()


class _Critical:
    """A block a termination signal must not cut in two (its action runs once the block is complete). A plain
    context manager, not a generator: it is entered at every read point of every step."""

    __slots__ = ()

    def __enter__(self) -> None:
        _S.depth += 1

    def __exit__(self, *exc: Any) -> None:
        _S.depth -= 1
        if _S.depth == 0 and _S.pending is not None:
            action, _S.pending = _S.pending, None
            action()


_CRITICAL = _Critical()


def critical() -> _Critical:
    """``with critical():`` a block a termination signal must not cut in two."""
    return _CRITICAL


def defer(action: Callable[[], None]) -> bool:
    """From a signal handler: inside a critical section of this thread, keep ``action`` for the section's end
    and return True; outside one, return False (the handler acts now)."""
    if _S.depth > 0:
        _S.pending = action
        return True
    return False


__all__ = ["critical", "defer"]
