"""Run-scoped observers of the trace writer: who else follows every run opened inside a block.

A command (``risdiag trace --tensorboard DIR``) installs an observer around everything it runs; each
:class:`~ris_stability.records.TraceWriter` created inside asks it for a listener when its run folder opens
and calls that listener with its step rows, events and summary. The registry lives here, next to the
writer, so that records (low in the layers) never needs to know who listens: the sinks (higher up)
register themselves through :func:`observing_runs`. A context variable, not a global: threads and
asyncio tasks started elsewhere do not inherit another command's observer.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

Listener = Callable[[str, Mapping[str, Any]], None]  # ("step", row) / ("event", record) / ("summary", summary)


class RunObserver(Protocol):
    """Follows every run folder opened while it is installed."""

    def start_run(self, run_dir: Path, meta: Mapping[str, Any]) -> Listener: ...


_CURRENT: contextvars.ContextVar[RunObserver | None] = contextvars.ContextVar("ris_stability_run_observer",
                                                                              default=None)


def current_observer() -> RunObserver | None:
    """The observer installed by the innermost :func:`observing_runs` (None: the run folder alone)."""
    return _CURRENT.get()


@contextlib.contextmanager
def observing_runs(observer: RunObserver) -> Iterator[RunObserver]:
    """Install ``observer`` for the block: every TraceWriter opened inside reports to it."""
    token = _CURRENT.set(observer)
    try:
        yield observer
    finally:
        _CURRENT.reset(token)


__all__ = ["Listener", "RunObserver", "current_observer", "observing_runs"]
