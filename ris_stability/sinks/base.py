"""Sinks: the trace rows and events of a run, also written where users already look.

A :class:`SinkSet` is installed around a command (``with open_sinks(tensorboard=DIR, mlflow=True, wandb=True):``);
every :class:`~ris_stability.records.TraceWriter` created inside it adds the set as a listener of its
step rows, events and summary, which routes them to one per-run writer of each backend (one TensorBoard run
folder, one MLflow run, one W&B run per run folder). ``publish()`` at the end adds what exists only after the run:
report.md, the report's figures and the capsules. The run folder stays the record; a sink is a copy.

A sink never fails the training run: a missing extra or an unwritable target is one warning when the
set opens and that sink is left out; an error while writing is one warning and that sink stops.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

from ris_stability.records.listeners import Listener, RunObserver, current_observer, observing_runs

log = logging.getLogger(__name__)

# Step-row columns -> (tag prefix, keep the rest of the key). Tags are slash-grouped, as both tools group them.
_MATRIX_STATS = ("rank", "log10_cond", "min_gap", "max_cluster")
_PREFIXES = (("loss/", "loss/"), ("grad/", "grad_norm/"), ("grad_group/", "grad_norm_group/"),
             ("update_ratio/", "update_ratio/"), ("update_ratio_group/", "update_ratio_group/"),
             ("grad_nonfinite/", "grad_nonfinite/"), ("param/", "param_norm/"))
_FLAGS = {"loss": "loss/total", "lr": "train/lr", "skipped": "train/skipped", "nonfinite": "train/nonfinite"}


def scalar_tags(row: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one trace step row under tool tags: loss/<term>, grad_norm/<module> (``_total`` ->
    ``total``), update_ratio/<module>, train/lr and matrix/<site>/<stat> for rank, log10 condition
    number, smallest gap and largest tied cluster. Non-numbers and missing values are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if value is None or isinstance(value, str):
            continue
        tag = _tag(key)
        if tag is not None:
            out[tag] = float(value)
    return out


def _tag(key: str) -> str | None:
    if key in _FLAGS:
        return _FLAGS[key]
    if key.startswith("mat/"):
        site, _, stat = key[4:].rpartition("/")
        return f"matrix/{site}/{stat}" if site and stat in _MATRIX_STATS else None
    for prefix, tag_prefix in _PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            return tag_prefix + ("total" if rest == "_total" else rest)
    return None


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")


def safe_name(tag: str) -> str:
    """A tag with the characters MLflow rejects (e.g. '@' of a call site) replaced by '_'."""
    return _UNSAFE.sub("_", tag)


def markdown_event(record: Mapping[str, Any]) -> str:
    step = record.get("step")
    where = f"step {step}" if step is not None else "run"
    return f"**{record.get('kind')}** ({record.get('severity')}, {where}): {record.get('message')}"


class RunSink(Protocol):
    """One backend's writer for one run folder."""

    def step(self, step: int, scalars: Mapping[str, float]) -> None: ...
    def event(self, record: Mapping[str, Any]) -> None: ...
    def publish(self, run_dir: Path) -> None: ...
    def close(self, status: str) -> None: ...


class Backend(Protocol):
    """A sink kind: ``check()`` raises with a clear message when it cannot work; ``open_run`` starts a run."""

    name: str

    def check(self) -> None: ...
    def open_run(self, run_dir: Path, meta: Mapping[str, Any]) -> RunSink: ...


class SinkSet:
    """The backends of one command, each isolated: its failures are warnings, never the run's."""

    def __init__(self, backends: list[Backend]):
        self.backends: list[Backend] = []
        for b in backends:
            if self._guard(b.name, "start", b.check):
                self.backends.append(b)
        self._runs: dict[Path, dict[str, RunSink]] = {}
        self._status: dict[Path, str] = {}
        self._last_step: dict[Path, int] = {}

    def _guard(self, name: str, what: str, fn: Callable[[], Any]) -> bool:
        try:
            fn()
            return True
        except Exception as exc:  # a sink must never end the training run: warn once, drop that sink
            log.warning("%s sink disabled (%s failed): %s: %s; the run goes on and its run folder is complete",
                        name, what, type(exc).__name__, exc)
            return False

    def _each(self, run_dir: Path, what: str, call: Callable[[RunSink], Any]) -> None:
        sinks = self._runs.get(Path(run_dir), {})
        for name in list(sinks):
            if not self._guard(name, what, lambda s=sinks[name]: call(s)):
                del sinks[name]

    # -- called by TraceWriter ----------------------------------------------------------------------------
    def start_run(self, run_dir: Path, meta: Mapping[str, Any]) -> Callable[[str, Mapping[str, Any]], None]:
        """Open one run of each backend; returns the writer's listener for that run folder."""
        run_dir = Path(run_dir)
        sinks: dict[str, RunSink] = {}
        for b in self.backends:
            self._guard(b.name, "opening a run", lambda b=b: sinks.__setitem__(b.name, b.open_run(run_dir, meta)))
        self._runs[run_dir] = sinks
        return lambda kind, record: self._listen(run_dir, kind, record)

    def _listen(self, run_dir: Path, kind: str, record: Mapping[str, Any]) -> None:
        if kind == "step":
            self._last_step[run_dir] = int(record["step"])
            scalars = scalar_tags(record)
            self._each(run_dir, "writing a step", lambda s: s.step(int(record["step"]), scalars))
        elif kind == "event":
            self._each(run_dir, "writing an event", lambda s: s.event(record))
        elif kind == "summary":
            self._status[run_dir] = str(record.get("status", "clean"))

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        """A metric the training reports itself (``report_metric``: e.g. a validation loss), as ``val/NAME`` of
        every open run, at ``step`` (default: the run's last logged step)."""
        for run_dir in list(self._runs):
            at = self._last_step.get(run_dir, 0) if step is None else step
            tag = {safe_name(f"val/{name}"): float(value)}
            self._each(run_dir, "writing a metric", lambda s, at=at, tag=tag: s.step(at, tag))

    # -- called once the command is over -------------------------------------------------------------------
    def publish(self) -> None:
        """Add report.md, figures and capsules of every run seen, then close each run."""
        for run_dir in list(self._runs):
            self._each(run_dir, "publishing the report", lambda s, d=run_dir: s.publish(d))
            self._each(run_dir, "closing", lambda s, d=run_dir: s.close(self._status.get(d, "clean")))
            del self._runs[run_dir]


def current_sinks() -> SinkSet | None:
    """The sink set installed by the innermost ``open_sinks`` (None: the run folder alone, or another
    kind of run observer)."""
    observer = current_observer()
    while isinstance(observer, _AlsoListen):  # a sweep's extra listener around the command's sinks
        observer = observer.inner
    return observer if isinstance(observer, SinkSet) else None


@contextlib.contextmanager
def open_sinks(tensorboard: str | Path | None = None, mlflow: bool = False,
               mlflow_experiment: str | None = None, wandb: bool = False) -> Iterator[SinkSet | None]:
    """Install the sinks for the block; on exit publish reports and close every run (also on error)."""
    backends: list[Backend] = []
    if tensorboard is not None:
        from ris_stability.sinks.tensorboard import TensorBoardBackend

        backends.append(TensorBoardBackend(Path(tensorboard)))
    if mlflow:
        from ris_stability.sinks.mlflow import MLflowBackend

        backends.append(MLflowBackend(mlflow_experiment))
    if wandb:
        from ris_stability.sinks.wandb import WandbBackend

        backends.append(WandbBackend())
    if not backends:
        yield None
        return
    sinks = SinkSet(backends)
    try:
        with observing_runs(sinks):  # every TraceWriter opened in the block adds the set as a listener
            yield sinks
    finally:
        sinks.publish()


class _AlsoListen:
    """The installed run observer (sinks or none) plus one more listener for every trace writer of a block."""

    def __init__(self, inner: RunObserver | None, make: Callable[[Path, Mapping[str, Any]], Listener]):
        self.inner, self.make = inner, make

    def start_run(self, run_dir: Path, meta: Mapping[str, Any]) -> Listener:
        inner = self.inner.start_run(run_dir, meta) if self.inner is not None else None
        mine = self.make(Path(run_dir), meta)

        def listen(kind: str, record: Mapping[str, Any]) -> None:
            if inner is not None:  # the sinks first: the extra listener may end the run (a sweep's pruner)
                inner(kind, record)
            mine(kind, record)
        listen.each_step = getattr(mine, "each_step", False)  # a pruner judges each step as it ends
        return listen


@contextlib.contextmanager
def also_listen(make: Callable[[Path, Mapping[str, Any]], Listener]) -> Iterator[None]:
    """Inside the block every TraceWriter also calls ``make(run_dir, meta)``'s listener with its step rows,
    events and summary, after the installed sinks: how a sweep's trial process follows the traced script."""
    with observing_runs(_AlsoListen(current_observer(), make)):
        yield


__all__ = ["Backend", "RunSink", "SinkSet", "also_listen", "current_sinks", "markdown_event", "open_sinks", "safe_name",
           "scalar_tags"]
