"""Termination signals flush the run as Ctrl-C does: SIGTERM (what SLURM, Kubernetes and torchrun's elastic
agent send on preemption or timeout) and, when asked for, SIGUSR1 (what SLURM sends before the time limit)
end the traced script with :class:`Terminated`, which the script runner turns into a finished run: step rows,
events, summary.json (status ``terminated``), sinks and report.md, then the conventional exit code 128 + N.

Installed only for the run (:class:`FlushOnSignals`, a context manager on the main thread) and removed at its
end, putting back exactly the handler it found; a handler the script installs for itself replaces ours and is
left in place (the script keeps it), and a handler installed outside Python (which Python could not put back)
is left alone: that signal is not flushed on. A
signal that arrives once the script has ended on its own asks for what is already under way: the flush goes
on (summary.json first), and waits on other ranks are cut short (:func:`asked_to_end`). A further signal gets
the handling it has without the toolkit (the previous handler is put back and the signal raised again: by
default the process ends by it at once); the folder is left readable, because every record file is appended
line by line and every artefact is written under a temporary name and renamed.
"""
from __future__ import annotations

import functools
import logging
import signal
import threading
from types import FrameType
from typing import Any, Iterable

from ris_stability.observe.critical import defer

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM",)
OPTIONAL_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGHUP")  # --flush-on NAME accepts these besides SIGTERM
_ASKED_TO_END = threading.Event()  # a signal came during the flush: finish it without waiting on other ranks


class Terminated(BaseException):
    """The run was ended by a termination signal (a BaseException, as KeyboardInterrupt: a script's
    ``except Exception`` must not swallow it)."""

    run_status = "terminated"

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"{self.name} received: the run was flushed and ends with exit code {self.exit_code}")


def signal_numbers(names: Iterable[str]) -> list[int]:
    """Signal numbers of ``names`` (e.g. "SIGUSR1" or "USR1"); unknown ones raise ValueError naming them."""
    numbers = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if key not in DEFAULT_SIGNALS + OPTIONAL_SIGNALS or not hasattr(signal, key):
            raise ValueError(f"--flush-on {name!r}: not a signal this platform can flush on; choose from "
                             f"{', '.join(s for s in DEFAULT_SIGNALS + OPTIONAL_SIGNALS if hasattr(signal, s))}")
        numbers.append(int(getattr(signal, key)))
    return numbers


class FlushOnSignals:
    """While entered, ``signums`` raise :class:`Terminated` in the main thread (the script stops where it is
    and the runner flushes); after :meth:`flushing` one lets the flush finish; a second one is handled as without the toolkit."""

    def __init__(self, signums: Iterable[int] = ()):
        self.signums = list(dict.fromkeys(int(s) for s in signums))
        self._previous: dict[int, Any] = {}
        self.received: int | None = None
        self._flushing = False

    def __enter__(self) -> "FlushOnSignals":
        if threading.current_thread() is not threading.main_thread():
            log.debug("termination signals not handled: the run is not on the main thread")
            return self
        _ASKED_TO_END.clear()
        try:
            for signum in self.signums:
                try:
                    if signal.getsignal(signum) is None:  # installed outside Python: it could not be put back
                        log.debug("signal %s not handled: its handler was not installed from Python", signum)
                        continue
                    self._previous[signum] = signal.signal(signum, self._handle)
                except (OSError, ValueError) as err:  # e.g. a signal this platform cannot catch
                    log.debug("signal %s not handled: %s", signum, err)
        except BaseException:  # e.g. Ctrl-C while installing: no handler of ours outlives a failed start
            self.__exit__(None, None, None)
            raise
        return self

    def flushing(self) -> None:
        """The script is over and the run is being written: a signal from now on lets the flush finish (without
        waiting on other ranks) and a second one is handled as without the toolkit."""
        self._flushing = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            # A second signal: the user or the scheduler insists. It gets the handling it has without the
            # toolkit (the handler that was there before ours; by default the process ends by the signal).
            # Every file written so far is complete or under a temporary name: the folder stays readable.
            signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        if self._flushing:
            # The script has already ended and its run is being written: that is what the signal asks for,
            # so the flush goes on (raising here would cut it short) without waiting on other ranks.
            _ASKED_TO_END.set()
            log.warning("%s received while the run is being written: finishing it now; a second one is handled "
                        "as without the toolkit", signal.Signals(signum).name)
            return
        self._flushing = True
        if not defer(functools.partial(_terminate, signum)):  # a step's records being completed: at their end
            raise Terminated(signum)

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            try:
                current = signal.getsignal(signum)
                if current == self._handle:  # a handler the script installed for itself stays (it owns it)
                    signal.signal(signum, previous)
            except (OSError, ValueError) as err:
                log.debug("signal %s handler not restored: %s", signum, err)
        self._previous = {}
        _ASKED_TO_END.clear()


def _terminate(signum: int) -> None:
    raise Terminated(signum)


def asked_to_end() -> bool:
    """True once a termination signal has arrived while a run is being written: waits on other ranks end now."""
    return _ASKED_TO_END.is_set()


__all__ = ["DEFAULT_SIGNALS", "FlushOnSignals", "OPTIONAL_SIGNALS", "Terminated", "asked_to_end", "signal_numbers"]
