"""One background thread that writes a run's capsules, so that the training step does not wait for the disk.

At the capsule point the training thread takes what the capsule needs as copies (``clone_state``: the tensors
stay on their device) and hands a *job* (the ``torch.save`` and the atomic rename, the budget's pruning) to
this writer. Jobs run one at a time, in the order they were submitted, on one thread: the budget of
:class:`~ris_stability.records.capsule_store.CapsuleStore` (first and most recent kept, the oldest in between
deleted) sees the same sequence of writes as the synchronous path and keeps the same files.

- **Bounded**: at most ``max_pending`` jobs wait (each holds a copy of the model, its optimizer state and the
  gradients). A submit to a full queue waits for room: the step then pays what a synchronous write costs,
  and nothing is dropped.
- **Results on the training thread**: a job's ``done(result, error)`` callback (the ``capsule_written`` /
  ``capsule_dropped`` / ``capsule_not_written`` events) runs on the thread that calls :meth:`collect` or
  :meth:`drain` (the monitor does at each step's end and at the run's end), never on the writer thread: the
  trace files and live view are written from one thread only.
- **Errors** (a full disk: ``OSError``, or the ``RuntimeError`` torch.save wraps it in; any ``Exception``)
  are caught on the writer thread and handed to ``done`` as ``error``: never raised into training, never lost.
- **Nothing lost**: :meth:`drain` waits for every job (the monitor drains before the summary, hence at
  finish_run / close_run, at a SIGTERM flush, on a crash); :func:`wait_all` waits for the jobs of every
  writer of the process (called by ``Capsule.load``, ``list_capsules`` and the locator's re-run before they
  read a capsule back) and runs at interpreter exit (``atexit``).

``background=False`` is the old synchronous path (each job runs inside :meth:`submit`), kept for tests and
for ``benchmarks/capsule_bench.py``.
"""
from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from typing import Any, Callable

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 2  # capsules copied and waiting for the disk (each a copy of model + optimizer + grads)

Job = Callable[[], Any]
Done = Callable[[Any, "BaseException | None"], None]

_WRITERS: "weakref.WeakSet[CapsuleWriter]" = weakref.WeakSet()
_STOP = object()


class CapsuleWriter:
    """Runs capsule jobs on one background thread (or inline with ``background=False``)."""

    def __init__(self, background: bool = True, max_pending: int = DEFAULT_MAX_PENDING, name: str = "capsules"):
        self.background = background
        self._jobs: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._finished: list[tuple[Done, Any, BaseException | None]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._name = name
        _WRITERS.add(self)

    def submit(self, job: Job, done: Done) -> None:
        """Run ``job`` (in the background, after the jobs before it); ``done(result, error)`` runs at the next
        :meth:`collect` or :meth:`drain` (synchronous path: at once)."""
        if not self.background:
            done(*_run(job))
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=f"risdiag-{self._name}", daemon=True)
            self._thread.start()
        self._jobs.put((job, done))  # a full queue: wait for room (the cost of a synchronous write), drop nothing

    @property
    def pending(self) -> int:
        """Jobs submitted whose ``done`` has not run yet (queued, being written, or written and not collected)."""
        with self._lock:
            return self._jobs.unfinished_tasks + len(self._finished)

    def collect(self) -> None:
        """Run ``done`` of the jobs finished so far, on the calling thread (cheap when none has)."""
        if not self._finished:
            return
        with self._lock:
            finished, self._finished = self._finished, []
        for done, result, error in finished:
            try:
                done(result, error)
            except Exception:  # e.g. the trace already closed at interpreter exit: say so, go on
                log.warning("capsule writer: the result of a capsule write could not be recorded", exc_info=True)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every submitted job has run (files written or failed); ``done`` is not run here."""
        if self._thread is not None and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._jobs.join() if timeout is None else _join(self._jobs, timeout)

    def drain(self) -> None:
        """Wait for every job, then run their ``done`` callbacks: after it, every capsule submitted is on disk
        (or its error recorded)."""
        self.wait()
        self.collect()

    def close(self) -> None:
        """Drain and stop the thread (a later submit starts a new one)."""
        self.drain()
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put((_STOP, None))
            self._thread.join()
        self._thread = None

    def _loop(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                if job is _STOP:
                    return
                result, error = _run(job)
                if error is not None:
                    log.debug("capsule writer: job failed: %s: %s", type(error).__name__, error)
                with self._lock:
                    self._finished.append((done, result, error))
            finally:
                self._jobs.task_done()


def _run(job: Job) -> tuple[Any, BaseException | None]:
    try:
        return job(), None
    except Exception as err:  # a full disk, a refused object: the caller records it; training goes on
        return None, err


def _join(jobs: queue.Queue, timeout: float) -> None:
    with jobs.all_tasks_done:
        jobs.all_tasks_done.wait_for(lambda: not jobs.unfinished_tasks, timeout=timeout)


def wait_all() -> None:
    """Wait until the capsules of every writer in this process are on disk (before one is read back)."""
    for writer in list(_WRITERS):
        writer.wait()


def _at_exit() -> None:
    for writer in list(_WRITERS):
        try:
            writer.drain()
        except Exception:
            log.warning("capsule writer: not drained at exit", exc_info=True)


atexit.register(_at_exit)

__all__ = ["CapsuleWriter", "DEFAULT_MAX_PENDING", "wait_all"]
