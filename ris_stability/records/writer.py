"""Writer of a run folder: append-only, flushed JSONL lines, atomic JSON files.

The writer appends and flushes one line per step, so a killed process loses at most the step being
written. JSON has no NaN/inf literals: in step rows a non-finite float is written as the string "nan", "inf"
or "-inf" (null means "not recorded"); in events and the JSON files as null. It needs only the standard
library.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import numbers
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ris_stability.records.appender import AppendFile, warn
from ris_stability.records.atomic import write_text_atomic
from ris_stability.records.listeners import Listener, current_observer
from ris_stability.records.schema import (EVENT_KINDS, EVENTS_FILE, FINDING_FILE, META_FILE, SCHEMA_NAME,
                                          SCHEMA_VERSION, SEVERITIES, STEPS_FILE, SUMMARY_FILE, TraceError)

logger = logging.getLogger(__name__)


def _jsonable(value: Any, key: str, keep_nonfinite: bool = False) -> Any:
    """Plain-JSON form of one value. Non-finite floats become "nan"/"inf"/"-inf" with ``keep_nonfinite``
    (step rows), else None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        as_float = float(value)
        if math.isfinite(as_float):
            return as_float
        return _nonfinite_text(as_float) if keep_nonfinite else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{key}.{k}", keep_nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{key}[{i}]", keep_nonfinite) for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    raise TypeError(
        f"trace value {key!r} has type {type(value).__name__}, which the trace cannot store; "
        "pass a Python number, bool, str, None, list or dict (call .item() on 0-d tensors)"
    )


_PLAIN = (int, bool, str, type(None))


def _row_value(value: Any, key: str) -> Any:
    """A step row's value: the common float / int / bool / str without the general walk of _jsonable."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else _nonfinite_text(value)
    if kind in _PLAIN:
        return value
    return _jsonable(value, key, keep_nonfinite=True)


def _nonfinite_text(value: float) -> str:
    return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"


def _dumps(obj: Mapping[str, Any], what: str, keep_nonfinite: bool = False) -> str:
    return json.dumps(_jsonable(obj, what, keep_nonfinite), allow_nan=False, separators=(",", ":"))


def write_json_atomic(path: Path, obj: Mapping[str, Any]) -> Path:
    """Write a JSON file via a temporary file + rename, so a crash never leaves half a file."""
    path = Path(path)
    text = json.dumps(_jsonable(obj, path.name), allow_nan=False, indent=2, sort_keys=True)
    try:
        write_text_atomic(path, text + "\n")
    except OSError as exc:
        raise TraceError(f"cannot write {path}: {exc}. Check that the folder exists and is writable.") from exc
    return path


def write_finding(run_dir: Path, finding: Mapping[str, Any]) -> Path:
    """Store the bisector's Finding.to_dict() as run_dir/finding.json."""
    return write_json_atomic(Path(run_dir) / FINDING_FILE, finding)


def append_event(run_dir: Path, kind: str, severity: str, message: str, step: int | None = None,
                 **data: Any) -> None:
    """One event added to a finished run's events.jsonl (e.g. ``risdiag locate``'s finding), in the format
    TraceWriter writes; ``time_s`` is None: it happened after the run."""
    if severity not in SEVERITIES:
        raise ValueError(f"event severity must be one of {SEVERITIES}, got {severity!r}")
    record = {"step": step, "time_s": None, "kind": kind, "severity": severity, "message": str(message),
              "data": data}
    with open(Path(run_dir) / EVENTS_FILE, "a", encoding="utf-8") as handle:
        handle.write(_dumps(record, f"event {kind}") + "\n")


class TraceWriter:
    """Append-only writer of one run folder.

    `fsync=True` also forces each line to disk (survives a machine crash, costs ~ms per step);
    flushing alone already survives the process being killed.
    """

    def __init__(self, run_dir: Path, meta: Mapping[str, Any], *, fsync: bool = False,
                 listeners: Iterable[Listener] = ()) -> None:
        # Called with ("step", row) / ("event", record) after each line is written, ("summary", summary): how other instruments
        # (e.g. a sweep's pruner) follow a run as it happens without reading the files back.
        self.listeners = tuple(listeners)
        self.run_dir = Path(run_dir)
        self.fsync = fsync
        self._t0 = time.monotonic()
        self._closed = False
        self._disk_warned = False
        if (self.run_dir / META_FILE).exists():
            raise TraceError(
                f"{self.run_dir} already holds a trace ({META_FILE} exists); appending would mix two runs. "
                "Choose another output folder or delete the old run."
            )
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            full_meta = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            full_meta.update(meta)
            full_meta.update(schema=SCHEMA_NAME, version=SCHEMA_VERSION)
            write_json_atomic(self.run_dir / META_FILE, full_meta)
            self._steps = AppendFile(self.run_dir / STEPS_FILE, fsync=fsync, on_error=self._disk_failed)
            self._events = AppendFile(self.run_dir / EVENTS_FILE, fsync=fsync, on_error=self._disk_failed)
        except OSError as exc:
            raise TraceError(
                f"cannot create the run folder {self.run_dir}: {exc}. Pass a writable output folder."
            ) from exc
        observer = current_observer()  # e.g. TensorBoard / MLflow sinks, when a command installed them
        if observer is not None:
            self.listeners += (observer.start_run(self.run_dir, full_meta),)

    def _disk_failed(self, failed: AppendFile) -> None:
        if not self._disk_warned:  # one warning for the run, whichever of its files the disk refused first
            self._disk_warned = True
            warn(failed)

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _append(self, handle, line: str) -> None:
        if self._closed:
            raise ValueError(f"TraceWriter for {self.run_dir} is closed; no more rows can be written")
        handle.write(line)  # a failing disk: one warning, the line kept and retried (records.appender)

    def step(self, row: Mapping[str, Any]) -> None:
        """Append one step row (flat keys per TRACE_SCHEMA); adds time_s when absent."""
        if not isinstance(row.get("step"), numbers.Integral) or isinstance(row.get("step"), bool):
            raise ValueError(f"step row needs an integer 'step' key, got {row.get('step')!r}")
        full = dict(row)
        full.setdefault("time_s", self.elapsed())
        flat = {str(key): _row_value(value, key) for key, value in full.items()}
        self._append(self._steps, json.dumps(flat, allow_nan=False, separators=(",", ":")))
        for listener in self.listeners:
            listener("step", full)

    def event(self, kind: str, severity: str, message: str, step: int | None = None, **data: Any) -> None:
        """Append one event; `data` holds the kind-specific fields (matrix, names, path, ...)."""
        if severity not in SEVERITIES:
            raise ValueError(f"event severity must be one of {SEVERITIES}, got {severity!r}")
        if not kind or not isinstance(kind, str):
            raise ValueError(f"event kind must be a non-empty string, got {kind!r}")
        if kind not in EVENT_KINDS:
            logger.debug("event kind %r is not one of the documented kinds %s", kind, EVENT_KINDS)
        record = {"step": step, "time_s": self.elapsed(), "kind": kind, "severity": severity,
                  "message": str(message), "data": data}
        self._append(self._events, _dumps(record, f"event {kind}"))
        for listener in self.listeners:
            listener("event", record)

    def summary(self, summary: Mapping[str, Any]) -> Path:
        """Write summary.json (steps, wall_s, nonfinite_steps, skipped_steps, final/best loss, status)."""
        lost = self.not_written()
        if lost:
            summary = {**summary, "not_written": lost}
        for listener in self.listeners:
            listener("summary", summary)
        path = self.run_dir / SUMMARY_FILE
        try:
            return write_json_atomic(path, summary)
        except TraceError as err:  # the disk is full at the very end: the training is over, say so once
            logger.warning("%s; the run's summary is lost, its step rows and events are as listed above", err)
            return path

    def not_written(self) -> dict[str, Any]:
        """Per record file, what a failing disk kept from it (after one more try); empty when all was written."""
        lost = {}
        for name, handle in ((STEPS_FILE, self._steps), (EVENTS_FILE, self._events)):
            handle.retry()
            if handle.losses() is not None:
                lost[name] = handle.losses()
        return lost

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._steps.close()
        self._events.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
